"""`status`'s per-node ``nats-server /healthz`` check (iotplat/verify/nats_cluster.py ``node_serves``) on a real
3-node nats-server 2.9.10 cluster on loopback, with JetStream, TLS, MQTT devices publishing QoS 1 (so the MQTT
layer's $MQTT_sess, $MQTT_msgs and $MQTT_rmsgs streams and its per-server consumers exist), a real worker replica
(so iotplat's durable consumer exists) and a real InfluxDB 1.6.7.

What it proves: the check is red for a node killed (-9); red for a node that answers
``/healthz?js-server-only=true`` ok but that the worker stream's leader sees behind (the killed node's last real
answer beside what the live nodes say of it); and, after the restart, every cluster check is green within
``RECOVERY_BOUND``. The full /healthz (the check before this change) is watched too: when it is still red then, it
must name only the MQTT layer's own assets. Measured here: the full /healthz of a restarted follower stayed red
("$MQTT_rmsgs_… is not current") for all 60 s of the bound in most runs and for more than 300 s in one, as on the
local hosts (9 minutes), while the new check was green 0.2-1.1 s after the node's ports answered; in one run it
was ok after a few seconds, so the test does not demand that it stays red. What it cannot show: a host cut off
the network (needs hosts).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from iotplat.verify import nats_cluster
from iotplat.verify.nats_cluster import HEALTHZ, MONITOR_PATHS, NODE_CHECK, cluster_checks
from iotplat.verify.status import Check
from support.natscluster import FailoverPublisher, NatsCluster, nats_worker_config
from support.waits import wait_until
from support.workerproc import WorkerProc
from tests.nats.natsmonitor import monitor_answers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Seconds from the restarted node's monitoring port answering to its check being green. nats-server 2.9.10 marks a
# raft follower current once it has applied what it committed and heard from its leader within two heartbeats
# (hbInterval 1 s, server/raft.go); the meta group, the stream and the consumer each catch up a few hundred
# messages from their leaders here, in well under a second each on loopback. 60 s leaves room for a loaded
# 2-core machine and for a new meta/stream leader election (election timeouts of a few seconds) without
# accepting the minutes the full /healthz was seen red for.
RECOVERY_BOUND = 60.0


def _answers(cluster: NatsCluster) -> dict:
    return {n.name: (monitor_answers(n.http_port, MONITOR_PATHS) if n.alive() else "killed")
            for n in cluster.nodes}


def _probe(cluster: NatsCluster) -> SimpleNamespace:
    """A Probe for ``nats_cluster.checks``: its hosts run the real monitoring script (``_SCRIPT``) here instead of
    over SSH (without sudo), each on its node's loopback port instead of 8222."""
    from iotplat.services.nats import MONITOR_PORT

    def host(n) -> SimpleNamespace:
        return SimpleNamespace(name=n.name, remote_argv=lambda argv: [
            sys.executable, "-c", argv[-1].replace(f"127.0.0.1:{MONITOR_PORT}", f"127.0.0.1:{n.http_port}")])

    return SimpleNamespace(platform=SimpleNamespace(placement={"broker": [n.name for n in cluster.nodes]}),
                           hosts={n.name: host(n) for n in cluster.nodes})


def _node_check(checks: list[Check], node: str) -> Check:
    return next(c for c in checks if c.name == NODE_CHECK and c.host == node)


def _full_healthz(cluster: NatsCluster, node: str) -> dict | str:
    got = monitor_answers(cluster.node(node).http_port, ("/healthz",))
    return got if isinstance(got, str) else got["/healthz"]


def _devices(cluster: NatsCluster, per_device: int, rate: float) -> list[FailoverPublisher]:
    ports = [n.mqtt_port for n in cluster.nodes]
    pubs = []
    for d in range(len(cluster.nodes) * 2):
        order = ports[d % len(ports):] + ports[:d % len(ports)]
        name = f"dev{d:03d}"
        pubs.append(FailoverPublisher(order, name, cluster.passwords[name], cluster.ca_file,
                                      range(d * per_device, (d + 1) * per_device), rate))
    return pubs


def test_a_killed_node_is_red_then_green_once_it_serves(clusters: list, influx, workers: list,
                                                        tmp_path: Path) -> None:
    cluster = NatsCluster.start(3, devices=6, workers=1)
    clusters.append(cluster)
    workers.append(WorkerProc(nats_worker_config(tmp_path, cluster, influx, replicas=1), replica=1).start(timeout=60))
    nodes = [n.name for n in cluster.nodes]
    pubs = _devices(cluster, per_device=600, rate=20.0)  # 2 devices per node, 30 s of QoS 1 telemetry each
    base = int(time.time() * 1000) - 600_000
    for p in pubs:
        p.start(base, timeout=240)
    seen: list = []

    def checks() -> list:
        seen[:] = cluster_checks(nodes, _answers(cluster))
        return seen

    wait_until(lambda: all(c.ok for c in checks()), 60, "a healthy cluster",
               lambda: [c for c in seen if not c.ok])
    healthy = [c for c in seen if c.name == NODE_CHECK]
    assert len(healthy) == 3 and all("iotplat_" in c.detail and "$MQTT_msgs" in c.detail for c in healthy), healthy

    # the victim: a node leading neither the meta group nor the worker's stream (as n2 on the local hosts, where
    # its full /healthz stayed red for more than 9 minutes)
    meta, leader = cluster.meta_leader(cluster.nodes[0]), cluster.stream_leader("$MQTT_msgs")
    victim = next(n for n in cluster.nodes if n.name not in (meta, leader))
    wait_until(lambda: sum(len(p.acked) for p in pubs) >= 200, 60, "devices acknowledged")
    stale = _answers(cluster)[victim.name]  # what the victim said while it served: used below
    victim.stop(signal.SIGKILL)
    assert not victim.alive()

    def victim_red_others_green() -> bool:
        cs = checks()
        others = [_node_check(cs, n) for n in nodes if n != victim.name]
        return not _node_check(cs, victim.name).ok and all(c.ok for c in others)

    wait_until(victim_red_others_green, 60, "the killed node red, the others green", lambda: seen)
    assert "not serving" in _node_check(seen, victim.name).detail
    # the same through `status`'s own reader (the script it runs over SSH): the killed node cannot be read
    via_script = nats_cluster.checks(_probe(cluster))  # type: ignore[arg-type]
    down = _node_check(via_script, victim.name)
    assert not down.ok and "Connection refused" in down.detail, down

    # a node that answers /healthz?js-server-only=true but that the stream's leader sees behind is red too: the
    # victim's last real answer from before the kill, beside what the live nodes say of it now (offline, behind)
    # (a leader counts a silent follower current until it misses new entries or for nats-server's lost-quorum
    # interval, 10 s: waited for, 30 s at most)
    assert stale[HEALTHZ]["status"] == "ok"
    lagging: list = []

    def victim_seen_behind() -> bool:
        lagging[:] = [_node_check(cluster_checks(nodes, {**_answers(cluster), victim.name: stale}), victim.name)]
        return not lagging[0].ok

    wait_until(victim_seen_behind, 30, "the killed node behind, as the stream's leader sees it",
               lambda: lagging)
    assert "not current" in lagging[0].detail and "behind its leader" in lagging[0].detail, lagging

    victim.launch()
    t0 = time.monotonic()
    wait_until(lambda: all(c.ok for c in checks()), RECOVERY_BOUND, "every cluster check green",
          lambda: [c for c in seen if not c.ok])
    recovered = time.monotonic() - t0
    via_script = nats_cluster.checks(_probe(cluster))  # type: ignore[arg-type]
    assert all(c.ok for c in via_script) and len([c for c in via_script if c.name == NODE_CHECK]) == 3, via_script
    # the pre-change check, the node's full /healthz, watched until it is ok or the bound is over: it may stay red
    # (measured here once: still "$MQTT_rmsgs_… not current" 300 s after the restart; other runs: ok within
    # seconds), and whenever it is red after ours is green it names the MQTT layer's assets, or the worker's consumer
    # at a moment iotplat's check (read beside it) has the node in sync with that consumer
    def read() -> tuple[dict | str, Check]:
        return _full_healthz(cluster, victim.name), _node_check(checks(), victim.name)

    full = [read()]
    while full[-1][0] != {"status": "ok"} and time.monotonic() - t0 < RECOVERY_BOUND:
        time.sleep(1)
        full.append(read())
    red = [f for f, _ in full if f != {"status": "ok"}]
    print(f"\n{victim.name} killed (-9) and restarted: every check green after {recovered:.1f}s "
          f"({_node_check(seen, victim.name).detail}); its full /healthz was red in {len(red)} of {len(full)} reads "
          f"until {time.monotonic() - t0:.0f}s after the restart: {red[-1] if red else 'never'}")
    for f, ours in full:
        if f == {"status": "ok"}:
            continue
        assert isinstance(f, dict) and f.get("status") == "unavailable", f
        error = str(f.get("error"))
        # the MQTT layer's assets; also the $MQTT_msgs stream itself for a moment while the restarted node catches
        # up (seen once in CI, 2026-12-06: "JetStream stream 'IOTPLAT > $MQTT_msgs' is not current")
        assert "$MQTT_" in error, f
        # the worker's consumer only while iotplat's check has the node in sync with it: nats-server 2.9.10 calls a
        # follower current only at the instants it has applied the leader's last entry, iotplat also when it follows
        # within IN_SYNC_LAG entries and IN_SYNC_SEEN_NS (iotplat/verify/nats_cluster.py, in_sync; seen in CI,
        # 2026-12-07: "JetStream consumer 'IOTPLAT > $MQTT_msgs > iotplat_...' is not current", once, after a kill)
        if "iotplat_" in error:
            assert ours.ok and "iotplat_" in ours.detail, (f, ours)
    for p in pubs:
        p.join(240)
    assert all(len(p.acked) == len(p.seqs) for p in pubs)


def _jsz(meta: str, stream_leader: str, replicas: dict[str, bool | dict], consumer_leader: str = "",
         consumer_replicas: dict[str, bool] | None = None) -> dict:
    """The fields of nats-server 2.9.10's /jsz?accounts=true&streams=true&consumers=true read here. A replica is
    current (True), behind (False: lag 7, last heard from 2 s ago) or given by its fields (a dict)."""
    def cluster(leader: str, reps: dict[str, bool | dict]) -> dict:
        return {"leader": leader, "replicas": [
            {"name": n, **(ok if isinstance(ok, dict) else
                           {"current": ok, "lag": 0 if ok else 7, "active": 2_000_000_000})} for n, ok in reps.items()]}
    consumers = [] if consumer_replicas is None else [
        {"name": "iotplat_0123456789ab", "cluster": cluster(consumer_leader, consumer_replicas)},
        {"name": "$MQTT_rmsgs_x", "cluster": cluster(consumer_leader, {n: False for n in consumer_replicas})}]
    return {"meta_cluster": {"leader": meta}, "account_details": [{"stream_detail": [
        {"name": "$MQTT_msgs", "cluster": cluster(stream_leader, replicas), "consumer_detail": consumers}]}]}


def _one(node: str, answers: dict, nodes: tuple[str, ...] = ("n1", "n2", "n3")):
    full = {n: a if isinstance(a, str) else {MONITOR_PATHS[1]: a[0], HEALTHZ: a[1]} for n, a in answers.items()}
    return _node_check(cluster_checks(list(nodes), full), node)


OK = {"status": "ok"}


@pytest.mark.parametrize("answers, node, ok, says", [
    # the stream's leader (n1) sees n3 behind; n3's own /healthz?js-server-only=true is ok
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": False}), OK), "n3": (_jsz("n1", "n1", {}), OK)},
     "n3", False, "$MQTT_msgs: behind its leader n1 (lag 7, seen 2.0s ago)"),
    # the worker's consumer: its leader (n2) sees n1 behind; a lagging $MQTT_rmsgs_ consumer is not looked at
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": True}), OK),
      "n2": (_jsz("n1", "n1", {}, "n2", {"n1": False, "n3": True}), OK)},
     "n1", False, "consumer iotplat_0123456789ab: behind its leader n2"),
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": True}), OK),
      "n2": (_jsz("n1", "n1", {}, "n2", {"n1": True, "n3": True}), OK), "n3": (_jsz("n1", "n1", {}), OK)},
     "n3", True, "current on $MQTT_msgs, iotplat_0123456789ab"),
    # JetStream without a meta leader: what nats-server says
    ({"n2": ({}, {"status": "unavailable", "error": "JetStream has not established contact with a meta leader"})},
     "n2", False, "unavailable: JetStream has not established contact with a meta leader"),
    ({"n2": "URLError: refused"}, "n2", False, "not serving: URLError: refused"),
    # the stream's leader does not answer: nothing says n2 is current
    ({"n2": (_jsz("n1", "n1", {"n2": True, "n3": True}), OK)}, "n2", False, "its leader n1 does not answer"),
    ({"n2": (_jsz("n1", "", {"n2": False, "n3": False}), OK)}, "n2", False, "$MQTT_msgs: it has no leader"),
    # under load: n3 not current at this instant but following closely (heard from 40 ms ago, 3 entries behind:
    # nats-server calls a follower current only while it reaches the leader's applied index) is in sync
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": {"current": False, "lag": 3, "active": 40_000_000}}), OK),
      "n3": (_jsz("n1", "n1", {}), OK)}, "n3", True, "current on $MQTT_msgs"),
    # ... but not when far behind, or silent for more than a heartbeat, or offline
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": {"current": False, "lag": 5000, "active": 40_000_000}}), OK),
      "n3": (_jsz("n1", "n1", {}), OK)}, "n3", False, "behind its leader n1 (lag 5000, seen 0.0s ago)"),
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": {"current": False, "lag": 3, "active": 1_500_000_000}}), OK),
      "n3": (_jsz("n1", "n1", {}), OK)}, "n3", False, "behind its leader n1 (lag 3, seen 1.5s ago)"),
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": {"current": False, "offline": True, "lag": 1, "active": 0}}), OK),
      "n3": (_jsz("n1", "n1", {}), OK)}, "n3", False, "behind its leader n1 (lag 1, offline)"),
    # R3 on 5 nodes: n5 holds no replica of the stream
    ({"n1": (_jsz("n1", "n1", {"n2": True, "n3": True}), OK), "n5": (_jsz("n1", "n1", {}), OK)},
     "n5", True, "current on $MQTT_msgs"),
])
def test_node_serves(answers: dict, node: str, ok: bool, says: str) -> None:
    """node_serves on the shapes real 2.9.10 nodes answer (the loopback test above reads real ones)."""
    nodes = ("n1", "n2", "n3", "n5") if "n5" in answers else ("n1", "n2", "n3")
    check = _one(node, answers, nodes)
    assert check.ok is ok and says in check.detail, check


def test_node_serves_on_one_node() -> None:
    """One node (JetStream not clustered: no cluster in /jsz): its /healthz?js-server-only=true decides."""
    jsz = {"meta_cluster": {}, "account_details": [{"stream_detail": [{"name": "$MQTT_msgs", "state": {}}]}]}
    assert _one("n1", {"n1": (jsz, OK)}, ("n1",)).ok
    assert not _one("n1", {"n1": (jsz, {"status": "unavailable", "error": "x"})}, ("n1",)).ok


@pytest.mark.parametrize("n3, ok", [
    ({"current": False, "lag": 3, "active": 40_000_000}, True),  # following closely under load
    ({"current": False, "lag": 5000, "active": 40_000_000}, False),  # catching up
])
def test_the_stream_check_counts_a_closely_following_replica_in_sync(n3: dict, ok: bool) -> None:
    nodes = ["n1", "n2", "n3"]
    full = {n: {MONITOR_PATHS[1]: _jsz("n1", "n1", {"n2": True, "n3": n3} if n == "n1" else {}), HEALTHZ: OK}
            for n in nodes}
    stream = next(c for c in cluster_checks(nodes, full) if c.name == "nats stream $MQTT_msgs")
    assert stream.ok is ok and ("not current: n3" in stream.detail) is not ok, stream
