"""The iotplat ingestion worker: MQTT (QoS 1, persistent session) -> InfluxDB, at-least-once.

Light on purpose: only the stdlib and paho-mqtt are imported here and below (worker hosts install
nothing else). See docs/worker.md.
"""
