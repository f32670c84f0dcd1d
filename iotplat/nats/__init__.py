"""The NATS broker engine: nats-server configuration, subject permissions and the JetStream plan.

Pure functions from typed values to typed results (or the text of a config file). The MQTT topic <->
subject mapping lives in ``iotplat.worker.nats_subjects`` because the worker needs it too (worker hosts
install only ``iotplat.worker``).
"""
