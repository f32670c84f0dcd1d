"""Failover on a real 3-node nats-server 2.9.10 cluster with JetStream, TLS everywhere, two worker replicas as
real processes and a real InfluxDB 1.6.7: devices publish QoS 1 telemetry, each message with a unique sequence
number, at a steady rate through different nodes. Every sequence number the broker acknowledged must be a row
in InfluxDB (and in fact every one sent: devices re-send what was not acknowledged).

What this cannot show: a host cut off the network (tests/nats/test_cluster_e2e.py test_06; here only one
replica's connection going silent, through tests/support/blackhole.py), and disks (every node's store is
on this machine's one disk; nats-server syncs JetStream files every 2 minutes by default, so "0 lost" after
a kill -9 rests on the other two replicas, as it would after a power cut of one host)."""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path

import pytest

from iotplat.secrets.passwords import bcrypt_many
from support.natscluster import FailoverPublisher, NatsCluster, nats_worker_config, reload_node, set_user
from support.waits import wait_until
from support.workerproc import WorkerProc

pytestmark = pytest.mark.integration


def _stored_seqs(influx) -> set[int]:
    return {int(r[1]) for r in influx.rows('SELECT "seq" FROM "iotplat"."telemetry"')}


def _wait_rows(influx, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = influx.count("telemetry", "seq")
        if got >= n:
            return got
        time.sleep(0.3)
    return got


def _devices(cluster: NatsCluster, n: int, per_device: int, rate: float, seq0: int = 0) -> list[FailoverPublisher]:
    pubs = []
    ports = [node.mqtt_port for node in cluster.nodes]
    for d in range(n):
        order = ports[d % len(ports):] + ports[:d % len(ports)]  # device d starts on node d % 3
        name = f"dev{d:03d}"
        pubs.append(FailoverPublisher(order, name, cluster.passwords[name], cluster.ca_file,
                                      range(seq0 + d * per_device, seq0 + (d + 1) * per_device), rate))
    return pubs


def _js_info(cluster: NatsCluster, node_index: int = 0) -> tuple[dict, dict]:
    """The stream's and the consumer's config, read with a worker's own credentials."""
    async def go():
        import nats

        from iotplat.worker.nats_subjects import durable_name, template_filter_subject

        nc = await nats.connect(f"tls://127.0.0.1:{cluster.nodes[node_index].client_port}",
                                tls=ssl.create_default_context(cafile=cluster.ca_file), user="iotplat-worker-1",
                                password=cluster.passwords["iotplat-worker-1"], inbox_prefix="_INBOX.iotplat-worker-1",
                                allow_reconnect=False)
        try:
            jsm = nc.jsm()
            s = await jsm.stream_info("$MQTT_msgs")
            durable = durable_name("iotplat", template_filter_subject("devices/+/telemetry", "$MQTT.msgs."))
            c = await jsm.consumer_info("$MQTT_msgs", durable)
            return s.config.as_dict(), c.config.as_dict()
        finally:
            await nc.close()
    return asyncio.run(go())


def test_node_stopped_then_killed_nothing_acknowledged_is_lost(clusters: list, influx, workers: list,
                                                                tmp_path: Path) -> None:
    """6 devices (2 per node) at 40 msg/s each for ~25 s. At 5 s node n2 stops gracefully (SIGTERM) and comes
    back at 9 s; at 14 s the node leading $MQTT_msgs is killed (-9) and comes back at 18 s. Devices on those
    nodes reconnect to another node; the workers follow; every message ends up in InfluxDB exactly once."""
    cluster = NatsCluster.start(3, devices=6, workers=2)
    clusters.append(cluster)
    cfg = nats_worker_config(tmp_path, cluster, influx, inflight=500, replicas=2, ack_wait=5.0)
    for r in (1, 2):
        workers.append(WorkerProc(cfg, replica=r).start(timeout=60))
    stream, consumer = _js_info(cluster)
    assert stream["num_replicas"] == 3 and stream["retention"] == "interest" and stream["discard"] == "new"
    assert stream["max_bytes"] == 256 << 20 and stream["subjects"] == ["$MQTT.msgs.>"]
    assert consumer["ack_policy"] == "explicit" and consumer["max_ack_pending"] == 1000
    assert consumer["ack_wait"] == 5_000_000_000 and consumer["filter_subject"] == "$MQTT.msgs.devices.*.telemetry"

    per_device, rate = 1000, 40.0
    pubs = _devices(cluster, 6, per_device, rate)
    base = int(time.time() * 1000) - 600_000
    t0 = time.monotonic()
    for p in pubs:
        p.start(base, timeout=240)

    def at(seconds: float) -> None:
        while time.monotonic() - t0 < seconds:
            time.sleep(0.05)

    at(5)
    n2 = cluster.node("n2")
    n2.stop(signal.SIGTERM)
    assert not n2.alive()
    at(9)
    n2.launch()
    cluster.wait_ready(nodes=[n2])
    at(14)
    leader = cluster.stream_leader("$MQTT_msgs") or "n1"
    victim = cluster.node(leader)
    victim.stop(signal.SIGKILL)
    at(18)
    victim.launch()
    cluster.wait_ready(nodes=[victim])
    for p in pubs:
        p.join(240)
    total = 6 * per_device
    got = _wait_rows(influx, total, 120)
    stored = _stored_seqs(influx)
    acked = set().union(*(p.acked for p in pubs))
    print(f"\nnode failover: {total} sent, {len(acked)} acknowledged, {got} rows; killed {leader}; "
          f"reconnects {[p.pub.reconnects for p in pubs]}; longest ack gap per device "
          f"{[round(p.max_gap, 2) for p in pubs]} s; worker received "
          f"{[w.metrics().get('iotplat_worker_messages_received_total') for w in workers]}")
    assert len(acked) == total
    assert not acked - stored, f"acknowledged but lost: {sorted(acked - stored)[:20]}"
    assert stored == set(range(total)) and got == total
    assert sum(p.pub.reconnects for p in pubs) >= 2  # the devices of two stopped nodes moved
    assert max(p.max_gap for p in pubs) < 20  # within the publisher's reconnect loop, not a stall
    for w in workers:
        assert w.alive()
        assert w.metrics().get("iotplat_worker_messages_received_total", 0) > 0  # both shared the work


def test_worker_killed_the_other_takes_over(clusters: list, influx, workers: list, tmp_path: Path) -> None:
    """Two replicas share one durable consumer. Replica 1 holds its batches for 1 s (so it always has
    unacknowledged messages) and is killed -9 mid-load: replica 2 keeps receiving at once, the messages replica
    1 held come back to replica 2 after ack_wait (counted as redeliveries), and nothing is lost."""
    cluster = NatsCluster.start(3, devices=3, workers=2)
    clusters.append(cluster)
    slow = nats_worker_config(tmp_path / "r1", cluster, influx, inflight=500, replicas=2, ack_wait=3.0, max_delay=1.0)
    fast = nats_worker_config(tmp_path / "r2", cluster, influx, inflight=500, replicas=2, ack_wait=3.0)
    r1 = WorkerProc(slow, replica=1).start(timeout=60)
    r2 = WorkerProc(fast, replica=2).start(timeout=60)
    workers += [r1, r2]
    per_device, rate = 800, 40.0
    pubs = _devices(cluster, 3, per_device, rate)
    base = int(time.time() * 1000) - 600_000
    t0 = time.monotonic()
    for p in pubs:
        p.start(base, timeout=180)
    r1.wait_metric("iotplat_worker_messages_received_total", 200, timeout=30)
    while time.monotonic() - t0 < 8:
        time.sleep(0.05)
    before = r2.metrics().get("iotplat_worker_messages_received_total", 0)
    r1.kill(signal.SIGKILL)
    killed = time.monotonic()
    r2.wait_metric("iotplat_worker_messages_received_total", before + 50, timeout=5)
    takeover = time.monotonic() - killed
    for p in pubs:
        p.join(180)
    total = 3 * per_device
    got = _wait_rows(influx, total, 60)
    redeliveries = r2.metrics().get("iotplat_worker_redeliveries_total", 0)
    print(f"\nworker failover: replica 2 received 50 more within {takeover:.2f} s of the kill; {redeliveries:.0f} "
          f"redeliveries after ack_wait; {got}/{total} rows")
    assert _stored_seqs(influx) == set(range(total)) and got == total
    assert redeliveries > 0


def test_a_worker_connection_gone_silent_loses_nothing_and_the_replica_pulls_again(
        clusters: list, influx, workers: list, tmp_path: Path) -> None:
    """Replica 2 reaches the cluster only through three proxies (tests/support/blackhole.py), one per node; mid-load
    the proxy carrying its connection goes silent as a cut-off host does (nothing forwarded, nothing closed), with
    its pull requests and acknowledgements in flight. Replica 1 keeps working and takes over what replica 2 held
    after ack_wait; replica 2 finds the connection dead (its PINGs go unanswered), reconnects through another
    proxy, and shares a second wave of messages again; every acknowledged message is in InfluxDB. This is the
    worker's side of tests/nats/test_cluster_e2e.py test_06 (a whole host cut off) on loopback, each step visible
    in the replica's /healthz; what it cannot show is the broker node's side (its routes and raft groups losing a
    member), which only the hosts test has."""
    from support.blackhole import BlackholeProxy

    cluster = NatsCluster.start(3, devices=6, workers=2)
    clusters.append(cluster)
    proxies = [BlackholeProxy(n.client_port) for n in cluster.nodes]
    try:
        direct = nats_worker_config(tmp_path / "r1", cluster, influx, inflight=500, replicas=2, ack_wait=5.0)
        proxied = nats_worker_config(tmp_path / "r2", cluster, influx, inflight=500, replicas=2, ack_wait=5.0,
                                     nats_extra={"servers": [f"127.0.0.1:{p.port}" for p in proxies]})
        r1 = WorkerProc(direct, replica=1).start(timeout=60)
        r2 = WorkerProc(proxied, replica=2).start(timeout=60)
        workers += [r1, r2]
        per_device, rate = 400, 40.0  # a wave lasts 10 s
        waves = [_devices(cluster, 6, per_device, rate)]
        base = int(time.time() * 1000) - 600_000
        for p in waves[0]:
            p.start(base, timeout=240)
        r2.wait_metric("iotplat_worker_messages_received_total", 300, timeout=30)
        carrying = [p for p in proxies if p.open_connections()]
        assert len(carrying) == 1, [p.open_connections() for p in proxies]
        silent = f"127.0.0.1:{carrying[0].port}"
        carrying[0].cut()
        cut = time.monotonic()
        held = r2.metrics().get("iotplat_worker_messages_received_total", 0)
        seen: list = []

        def reconnected() -> bool:
            seen[:] = [r2.health()[1].get("transport", {})]
            return bool(seen[0].get("connected")) and seen[0].get("server") not in ("", silent)

        wait_until(reconnected, 90, "replica 2 connected through another node", lambda: seen)
        stalled = time.monotonic() - cut
        # 3 PINGs unanswered (9 s), the TLS close on the dead path (nats_transport.TLS_SHUTDOWN_TIMEOUT, 2 s; it
        # was asyncio's 30 s), at most one try of the silent proxy (connect_timeout 5 s): 16 s, with a margin
        assert stalled < 25, f"replica 2 idle {stalled:.1f} s after its connection went silent"
        for p in waves[0]:
            p.join(240)
        waves.append(_devices(cluster, 6, per_device, rate, seq0=6 * per_device))
        for p in waves[1]:
            p.start(base, timeout=240)
        try:
            back = r2.wait_metric("iotplat_worker_messages_received_total", held + 200, timeout=60)
        except TimeoutError as e:
            raise AssertionError(f"replica 2 does not pull again: {e}; /healthz {r2.health()[1]}; the consumer: "
                                 f"{_consumer_views(cluster)}; log:\n{r2.log_tail(30)}") from None
        for p in waves[1]:
            p.join(240)
        total = 12 * per_device
        got = _wait_rows(influx, total, 120)
        stored = _stored_seqs(influx)
        pubs = waves[0] + waves[1]
        acked = set().union(*(p.acked for p in pubs))
        _, state = r2.health()
        print(f"\nsilent connection: replica 2 connected again {stalled:.1f} s after the cut and received "
              f"{back - held:.0f} more; transport {state.get('transport')}; {len(acked)} acknowledged, {got} rows; "
              f"replica 1 redeliveries {r1.metrics().get('iotplat_worker_redeliveries_total', 0):.0f}")
        assert len(acked) == total
        assert not acked - stored, f"acknowledged but lost: {sorted(acked - stored)[:20]}"
        assert stored == set(range(total)) and got == total
        transport = state["transport"]
        assert transport["connected"] and transport["pull_loop"] == "running" and transport["server"] != silent
        assert r1.alive() and r2.alive()
    finally:
        for p in proxies:
            p.close()


def test_a_worker_the_server_disconnected_for_good_connects_again(clusters: list, influx, workers: list,
                                                                  tmp_path: Path) -> None:
    """A reload that no longer accepts the replica's password (an operator's mistake, or `rotate` between the
    nodes' reload and the replica's restart) makes nats-server send "-ERR 'Authorization Violation'" and close
    the connection; nats-py then closes its client for good (it reconnects after a lost connection, never after
    an -ERR). The replica reports it, keeps trying with a new client, and once a reload accepts its password
    again it is connected and subscribed without a restart, and what the devices sent meanwhile is written.

    Three rounds, because the reconnect races the reloads: nats-server 2.9.10 can bind a client that connects
    while it reloads to an account the routes carry no interest for, so its pull requests are dropped
    (nats_transport.WATCH_IDLE). That happened in about one round out of three here: the watchdog must then
    replace the connection, or the messages never arrive."""
    cluster = NatsCluster.start(3, devices=3, workers=1)
    clusters.append(cluster)
    w = WorkerProc(nats_worker_config(tmp_path, cluster, influx, replicas=1), replica=1).start(timeout=60)
    workers.append(w)
    user = "iotplat-worker-1"
    other = bcrypt_many([(user, "not-the-worker-password-0123456789")], 4)[user]
    original = {n.name: n.conf.read_text() for n in cluster.nodes}
    seen: list = []

    def state() -> dict:
        seen[:] = [w.health()[1]]
        return seen[0]

    per_round, base = 100, int(time.time() * 1000) - 600_000
    for round_ in range(3):
        for n in cluster.nodes:
            set_user(n.conf, user, other)
            reload_node(n)
        wait_until(lambda: not state()["mqtt_connected"], 20, "the replica disconnected by the reload", lambda: seen)
        pubs = _devices(cluster, 3, per_round, 50.0, seq0=round_ * 3 * per_round)  # 2 s while it is refused
        for p in pubs:
            p.start(base, timeout=60)
        for p in pubs:
            p.join(60)
        assert sum(len(p.acked) for p in pubs) == 3 * per_round  # the stream keeps them
        for n in cluster.nodes:
            n.conf.write_text(original[n.name])
            reload_node(n)
        wait_until(lambda: state()["mqtt_connected"] and state()["transport"]["pull_loop"] == "running", 30,
                   "the replica connected again without a restart", lambda: seen)
        want = (round_ + 1) * 3 * per_round
        got = _wait_rows(influx, want, 60)
        if got != want:
            log = w.log_tail(60) + f"\n/healthz {w.health()[1]}\nthe consumer: {_consumer_views(cluster)}"
            raise AssertionError(f"round {round_ + 1}: {got}/{want} rows\n{log}")
    transport = state()["transport"]
    log = w.log_tail(200)
    print(f"\nrefused by a reload 3 times: {w.metrics().get('iotplat_worker_mqtt_connect_failures_total', 0):.0f} "
          f"failed connects; connections the watchdog replaced: {transport['renewed_connections']}\n"
          + "\n".join(ln for ln in log.splitlines() if "do not reach" in ln or "mqtt_connected" in ln))
    assert _stored_seqs(influx) == set(range(3 * 3 * per_round))
    assert "the NATS server closed the connection" in log and "authorization failed" in log, log
    assert w.alive()


def _consumer_views(cluster: NatsCluster) -> list[str]:
    """Each live node's view of the worker's consumer and of the connections subscribed to the pull inboxes."""
    views = []
    for n in cluster.nodes:
        if not n.alive():
            continue
        try:
            jsz = n.monitor("/jsz?consumers=true")
            for acc in jsz.get("account_details", []):
                for st in acc.get("stream_detail", []):
                    for c in st.get("consumer_detail") or []:
                        if c["name"].startswith("iotplat_"):
                            views.append(f"{n.name}: {c['name']} leader={c.get('cluster', {}).get('leader')} "
                                         f"delivered={c.get('delivered')} ack_floor={c.get('ack_floor')} "
                                         f"ack_pending={c.get('num_ack_pending')} pending={c.get('num_pending')} "
                                         f"waiting={c.get('num_waiting')} redelivered={c.get('num_redelivered')}")
            connz = n.monitor("/connz?subs=detail&limit=100")
            for conn in connz.get("connections", []):
                if str(conn.get("name", "")).startswith("iotplat-worker"):
                    subs = [d.get("subject") for d in conn.get("subscriptions_list_detail") or []]
                    views.append(f"{n.name}: conn {conn.get('cid')} {conn.get('name')} port {conn.get('port')} "
                                 f"rtt {conn.get('rtt')} pending_bytes {conn.get('pending_bytes')} in_msgs {conn.get('in_msgs')} "
                                 f"idle {conn.get('idle')} out_msgs {conn.get('out_msgs')} subs {subs}")
        except (OSError, ValueError) as e:
            views.append(f"{n.name}: {e}")
    return views
