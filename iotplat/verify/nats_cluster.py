"""`status` on broker.engine nats: the cluster's health from each node's monitoring endpoints.

Each broker host's nats-server answers ``/routez`` and ``/jsz`` on its loopback monitoring port (read over
SSH, never opened to the network). From what the nodes say:

- ``nats node``: each node answers (a node that does not is reported as down, by name: the cluster is degraded
  but keeps working while a majority answers);
- ``nats routes``: each answering node has a route to every other node of the spec;
- ``nats JetStream meta leader``: the answering nodes agree on one meta leader (none: JetStream cannot create
  or change streams, e.g. with a majority of the nodes down);
- ``nats stream <name>``: the worker's stream has a leader and every replica is current (a replica that is
  behind or missing is named: acknowledged messages are then on fewer nodes than the stream's replica count).

`cluster_checks` is pure (the monitoring JSON in, checks out), so tests feed it what real nodes answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from iotplat.worker.nats_subjects import MQTT_STREAM

if TYPE_CHECKING:
    from iotplat.hosts import Host
    from iotplat.verify.status import Check, Probe

MONITOR_PATHS = ("/routez", "/jsz?streams=true&accounts=true", "/varz")

_SCRIPT = r"""
import json, urllib.request
out = {}
for path in %s:
    try:
        out[path] = json.loads(urllib.request.urlopen("http://127.0.0.1:%d" + path, timeout=5).read())
    except Exception as e:
        out = {"error": type(e).__name__ + ": " + str(e)[:200]}
        break
print(json.dumps(out))
"""


def _stream(jsz: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for acc in jsz.get("account_details") or []:
        for s in acc.get("stream_detail") or []:
            if s.get("name") == name:
                return s
    return None


def cluster_checks(nodes: list[str], answers: Mapping[str, Mapping[str, Any] | str],
                   stream: str = MQTT_STREAM) -> list[Check]:
    """Checks from each node's monitoring answers: ``answers[node]`` is {path: JSON} for the paths in
    MONITOR_PATHS, or a string saying why the node could not be read."""
    from iotplat.verify.status import Check

    out: list[Check] = []
    up = {n: a for n, a in answers.items() if not isinstance(a, str)}
    for n in nodes:
        a = answers.get(n, "no answer")
        out.append(Check("nats node", not isinstance(a, str),
                         "answers" if not isinstance(a, str) else f"down or unreachable: {a}", host=n))
    # nats-server 2.9's /routez names a peer by its server id only: the answering nodes' /varz say whose it is
    # (a node that does not answer has no route to it either way)
    name_of = {(a.get("/varz") or {}).get("server_id", ""): n for n, a in up.items()}
    for n, a in up.items():
        if len(nodes) < 2:
            break
        peers = {name_of.get(r.get("remote_id", ""), "") for r in (a.get("/routez") or {}).get("routes") or []}
        missing = sorted(set(nodes) - {n} - peers)
        out.append(Check("nats routes", not missing, f"routes to {', '.join(sorted(peers & set(nodes))) or 'none'}"
                         + (f"; none to {', '.join(missing)}" if missing else ""), host=n))
    leaders = {n: ((a.get(MONITOR_PATHS[1]) or {}).get("meta_cluster") or {}).get("leader", "") for n, a in up.items()}
    if len(nodes) > 1:
        named = sorted(set(leaders.values()) - {""})
        ok = len(named) == 1 and all(leaders.values())
        said = ", ".join(f"{n}: {v or 'none'}" for n, v in sorted(leaders.items()))
        out.append(Check("nats JetStream meta leader", ok,
                         f"{named[0]} (as every answering node says)" if ok else f"no agreed leader: {said}"))
    # the stream's leader tracks its followers (a follower reports the others as not current): its answer first
    seen = {n: _stream(a.get(MONITOR_PATHS[1]) or {}, stream) for n, a in up.items()}
    detail = next((d for n, d in seen.items() if d and (d.get("cluster") or {}).get("leader") == n), None) \
        or next((d for d in seen.values() if d), None)
    if detail is None:
        out.append(Check(f"nats stream {stream}", False, "no answering node knows the stream (the worker creates it "
                                                           "on start)"))
        return out
    cluster = detail.get("cluster") or {}
    leader = cluster.get("leader", "")
    replicas = cluster.get("replicas") or []
    behind = sorted(r.get("name", "?") for r in replicas if not r.get("current"))
    members = sorted([leader, *(r.get("name", "?") for r in replicas)]) if leader else []
    if len(nodes) == 1:
        out.append(Check(f"nats stream {stream}", True, f"{(detail.get('state') or {}).get('messages', 0)} messages"))
    else:
        ok = bool(leader) and not behind
        out.append(Check(f"nats stream {stream}", ok,
                         (f"leader {leader}, replicas on {', '.join(members)}" if leader else "no leader")
                         + (f"; not current: {', '.join(behind)}" if behind else "")))
    return out


# ------------------------------------------------------------------------------ backup: the consumers' backlog
JSZ_CONSUMERS = "/jsz?accounts=true&streams=true&consumers=true"


def stream_last_seq(jsz: Mapping[str, Any], stream: str = MQTT_STREAM) -> int | None:
    """The stream's last sequence number as this node knows it (None: the node does not hold the stream)."""
    detail = _stream(jsz, stream)
    return None if detail is None else int((detail.get("state") or {}).get("last_seq", 0))


def unacked_through(jsz: Mapping[str, Any], upto: int, durable_prefix: str = "iotplat",
                    stream: str = MQTT_STREAM) -> list[str]:
    """The worker's durable consumers (``<durable_prefix>_<digest>``, iotplat/worker/nats_subjects.py) that may
    still hold a message with a stream sequence <= ``upto`` not acknowledged by a replica (the worker acks after
    the write to InfluxDB, or after it spooled the message), each as "name: why"; [] once every one is done.

    A consumer is done when its ack floor reached ``upto`` (everything up to it acknowledged), or when it has
    nothing unacknowledged and nothing left to deliver up to ``upto`` (a filtered consumer's floor stays at its
    last matching message). No worker consumer at all is reported too (the worker creates it on start)."""
    detail = _stream(jsz, stream)
    if detail is None:
        return [f"{stream}: this node does not hold the stream"]
    consumers = [c for c in detail.get("consumer_detail") or []
                 if str(c.get("name", "")).startswith(durable_prefix + "_")]
    if not consumers:
        return [f"{stream}: no worker consumer ({durable_prefix}_*) yet"]
    left = []
    for c in consumers:
        floor = int((c.get("ack_floor") or {}).get("stream_seq", 0))
        delivered = int((c.get("delivered") or {}).get("stream_seq", 0))
        ack_pending, pending = int(c.get("num_ack_pending", 0)), int(c.get("num_pending", 0))
        if floor >= upto or (ack_pending == 0 and (pending == 0 or delivered >= upto)):
            continue
        left.append(f"{c.get('name')}: acknowledged through {floor} of {upto}, {ack_pending} unacknowledged, "
                    f"{pending} not delivered yet")
    return left


def read_monitor(host: Host, paths: tuple[str, ...] = (JSZ_CONSUMERS,)) -> dict[str, Any]:
    """{path: JSON} from a broker host's loopback monitoring port (over SSH); raises RuntimeError if the node
    does not answer."""
    import json

    from iotplat.services.nats import MONITOR_PORT
    from iotplat.verify.status import _ssh_json

    got = _ssh_json(host, _SCRIPT % (json.dumps(list(paths)), MONITOR_PORT))
    if "error" in got:
        raise RuntimeError(f"nats-server on {host.name} does not answer: {got['error']}")
    return got


def checks(probe: Probe) -> list[Check]:
    """Read each broker host's monitoring endpoints over SSH and judge the cluster (``cluster_checks``)."""
    import json
    import subprocess

    from iotplat.services.nats import MONITOR_PORT
    from iotplat.verify.status import _ssh_json

    p = probe.platform
    nodes = list(p.placement["broker"])
    answers: dict[str, Mapping[str, Any] | str] = {}
    script = _SCRIPT % (json.dumps(list(MONITOR_PATHS)), MONITOR_PORT)
    for n in nodes:
        host = probe.hosts.get(n)
        if host is None:
            answers[n] = "no address"
            continue
        try:
            got = _ssh_json(host, script)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            answers[n] = f"cannot reach the host: {exc}"
            continue
        answers[n] = got["error"] if "error" in got else got
    return cluster_checks(nodes, answers)
