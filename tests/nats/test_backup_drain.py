"""`backup` on nats waits until the worker acknowledged what the stream held (iotplat/services/broker.py
``_drain_nats``), reading /jsz from any broker node that answers, not only the first broker host.

On a real 3-node nats-server 2.9.10 cluster on loopback with a real worker replica and a real InfluxDB 1.6.7,
node n1 (the host the backup hook is given) is killed (-9). The nodes' /jsz is read on loopback where a deployment
reads it over SSH (``nats_cluster.read_monitor`` is replaced by a loopback read that fails as it does: a
RuntimeError when the node does not answer); what it proves is the choice of nodes and the verdicts on real
answers, not the SSH transport (tests/nats/test_cluster_e2e.py covers that on hosts).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from iotplat.errors import IotplatError
from iotplat.services import broker
from iotplat.verify import nats_cluster
from support.natscluster import FailoverPublisher, NatsCluster, nats_worker_config
from support.workerproc import WorkerProc
from tests.nats.natsmonitor import monitor_answers

pytestmark = pytest.mark.integration


def _stand_ins(cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> tuple[SimpleNamespace, list[str]]:
    """A Context with the broker placement and ctx.hosts(), and the loopback read_monitor; the list records which
    node each read went to."""
    names = [n.name for n in cluster.nodes]
    hosts = [SimpleNamespace(name=n) for n in names]
    reads: list[str] = []

    def read_monitor(host, paths=(nats_cluster.JSZ_CONSUMERS,)):
        reads.append(host.name)
        got = monitor_answers(cluster.node(host.name).http_port, tuple(paths))
        if isinstance(got, str):
            raise RuntimeError(f"nats-server on {host.name} does not answer: {got}")
        return got

    monkeypatch.setattr(nats_cluster, "read_monitor", read_monitor)
    ctx = SimpleNamespace(platform=SimpleNamespace(placement={"broker": names}), hosts=lambda: hosts)
    return ctx, reads


def _publish(cluster: NatsCluster, ports: list[int], devices: range, per_device: int) -> int:
    base = int(time.time() * 1000) - 600_000
    pubs = [FailoverPublisher(ports[d % len(ports):] + ports[:d % len(ports)], f"dev{d:03d}",
                              cluster.passwords[f"dev{d:03d}"], cluster.ca_file,
                              range(d * per_device, (d + 1) * per_device), 100.0) for d in devices]
    for p in pubs:
        p.start(base, timeout=120)
    for p in pubs:
        p.join(120)
    assert all(len(p.acked) == per_device for p in pubs)
    return len(pubs) * per_device


def test_backup_reads_any_node_when_node_1_is_down(clusters: list, influx, workers: list, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = NatsCluster.start(3, devices=4, workers=1)
    clusters.append(cluster)
    worker = WorkerProc(nats_worker_config(tmp_path, cluster, influx, replicas=1), replica=1).start(timeout=60)
    workers.append(worker)
    ctx, reads = _stand_ins(cluster, monkeypatch)
    n1 = cluster.node("n1")
    acked = _publish(cluster, [n.mqtt_port for n in cluster.nodes], range(3), 200)
    n1.stop(signal.SIGKILL)
    assert not n1.alive()

    broker._drain_nats(ctx, ctx.hosts()[0], timeout=60, poll=0.2)  # type: ignore[arg-type]
    # n1 first (the host the hook is given), refused; then n2, which answers; n1 again only while n2 still names it
    # a leader of the stream or the consumer (the election after its kill takes seconds)
    assert reads[:2] == ["n1", "n2"], reads
    # done means done: the worker acks after the write, so every acknowledged message is in InfluxDB already
    assert influx.count("telemetry", "seq") >= acked

    # and it can fail: with the worker stopped, messages published since are not acknowledged in time
    worker.close()
    _publish(cluster, [n.mqtt_port for n in cluster.nodes[1:]], range(3, 4), 50)
    reads.clear()
    with pytest.raises(IotplatError, match=r"has not acknowledged every message .* iotplat_\w+: acknowledged "
                                           r"through \d+ of \d+"):
        broker._drain_nats(ctx, ctx.hosts()[0], timeout=2, poll=0.2)  # type: ignore[arg-type]
    assert "n1" in reads and {"n2", "n3"} & set(reads), reads

    # no node answers: one error naming each
    for n in cluster.nodes[1:]:
        n.stop(signal.SIGKILL)
    with pytest.raises(IotplatError, match=r"cannot read JetStream's state on any broker node \(n1: .*; n2: .*; "
                                           r"n3: .*\)"):
        broker._drain_nats(ctx, ctx.hosts()[0], timeout=2, poll=0.2)  # type: ignore[arg-type]


def _detail(leader: str, last_seq: int, *consumers: dict) -> dict:
    """The shape of nats-server 2.9's /jsz?accounts=true&streams=true&consumers=true, fields read here."""
    return {"account_details": [{"name": "IOTPLAT", "stream_detail": [
        {"name": "$MQTT_msgs", "cluster": {"leader": leader}, "state": {"last_seq": last_seq},
         "consumer_detail": list(consumers)}]}]}


def _consumer(leader: str, floor: int) -> dict:
    return {"name": "iotplat_0123456789ab", "cluster": {"leader": leader},
            "ack_floor": {"stream_seq": floor}, "delivered": {"stream_seq": floor + 5}, "num_ack_pending": 5,
            "num_pending": 0}


def test_the_leaders_views_are_used() -> None:
    """A follower (n3) trails: lower last_seq, lower ack floor. leaders_needed names the stream's (n2) and the
    consumer's (n1) leaders; leaders_jsz takes the stream from n2 and the consumer from n1."""
    follower = _detail("n2", 90, _consumer("n1", 80))
    assert nats_cluster.leaders_needed({"n3": follower}) == {"n1", "n2"}
    views = {"n3": follower, "n2": _detail("n2", 100, _consumer("n1", 85)),
             "n1": _detail("n2", 95, _consumer("n1", 97))}
    assert nats_cluster.leaders_needed(views) == set()
    merged = nats_cluster.leaders_jsz(views)
    assert nats_cluster.stream_last_seq(merged) == 100
    assert merged["account_details"][0]["stream_detail"][0]["consumer_detail"][0]["ack_floor"]["stream_seq"] == 97
    # leaders not read: any node's view (here the follower's)
    assert nats_cluster.stream_last_seq(nats_cluster.leaders_jsz({"n3": follower})) == 90
    assert nats_cluster.leaders_jsz({}) == {"account_details": []}
