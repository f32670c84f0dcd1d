"""`status` on broker.engine nats: the cluster's health from each node's monitoring endpoints.

Each broker host's nats-server answers ``/routez`` and ``/jsz`` on its loopback monitoring port (read over
SSH, never opened to the network). From what the nodes say:

- ``nats node``: each node answers (a node that does not is reported as down, by name: the cluster is degraded
  but keeps working while a majority answers);
- ``nats routes``: each answering node has a route to every other node of the spec;
- ``nats JetStream meta leader``: the answering nodes agree on one meta leader (none: JetStream cannot create
  or change streams, e.g. with a majority of the nodes down);
- ``nats stream <name>``: the worker's stream has a leader and every replica is in sync (``in_sync``: a replica
  that is behind or missing is named: acknowledged messages are then on fewer nodes than the stream's replica
  count);
- ``nats-server /healthz`` (one per node): the node serves. ``/healthz?js-server-only=true`` says ok (nats-server
  2.9.10: ready for connections, JetStream enabled, a meta leader known and this node current with it) and the
  node is current on what iotplat uses: the worker's stream and its durable consumers (``iotplat_*``), as their
  raft leaders see it. Not the full ``/healthz``: in 2.9.10 that also demands every stream and consumer the node
  holds a replica of be current, the MQTT layer's own included, and after a ``kill -9`` of a node its
  ``$MQTT_rmsgs_<server>`` consumer (retained messages, which iotplat does not use) was seen "not current" for
  more than 9 minutes on the local hosts while the node served devices and workers (docs/broker-engines.md).

`cluster_checks` is pure (the monitoring JSON in, checks out), so tests feed it what real nodes answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from iotplat.worker.nats_subjects import MQTT_STREAM

if TYPE_CHECKING:
    from iotplat.hosts import Host
    from iotplat.verify.status import Check, Probe

JSZ_CONSUMERS = "/jsz?accounts=true&streams=true&consumers=true"
# nats-server 2.9.10's /healthz options (server/monitor.go): js-enabled-only (JetStream on: what the role waits for
# after a restart), js-server-only (also a meta leader, and this node current with it; no stream or consumer)
HEALTHZ = "/healthz?js-server-only=true"
MONITOR_PATHS = ("/routez", JSZ_CONSUMERS, "/varz", HEALTHZ)
WORKER_DURABLE_PREFIX = "iotplat"  # the worker's durable consumers: iotplat_<digest> (iotplat/worker/nats_subjects.py)

# A replica is in sync when its raft leader calls it current, or while devices publish when it follows closely:
# nats-server 2.9.10 calls a follower current only while its last index reaches the leader's applied index
# (raft.go, Peers), which under load a follower a few entries behind misses at most instants, so `status` and the
# closing check of `up`/`rotate` failed on a healthy cluster while devices published. Following closely: heard
# from within one raft heartbeat (1 s) and at most IN_SYNC_LAG entries behind; a follower that is catching up
# after a restart, or that the leader has not heard from, is not in sync.
IN_SYNC_SEEN_NS = 1_000_000_000
IN_SYNC_LAG = 1000


def in_sync(replica: Mapping[str, Any]) -> bool:
    """A stream's or consumer's replica as its leader's /jsz describes it (name, current, offline, active, lag)."""
    if replica.get("current"):
        return True
    active, lag = replica.get("active"), replica.get("lag", 0)
    return (not replica.get("offline") and isinstance(active, int) and 0 <= active <= IN_SYNC_SEEN_NS
            and isinstance(lag, int) and lag <= IN_SYNC_LAG)


# /healthz answers 503 with {"status": "unavailable", "error": ...} when not healthy: that is an answer, not a
# node that cannot be read
_SCRIPT = r"""
import json, urllib.error, urllib.request
out = {}
for path in %s:
    try:
        out[path] = json.loads(urllib.request.urlopen("http://127.0.0.1:%d" + path, timeout=5).read())
    except urllib.error.HTTPError as e:
        if not path.startswith("/healthz"):
            out = {"error": "HTTP " + str(e.code) + " on " + path}
            break
        try:
            out[path] = json.loads(e.read() or b"{}")
        except ValueError:
            out[path] = {"status": "HTTP " + str(e.code)}
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


NODE_CHECK = "nats-server /healthz"


def _leader_answer(views: Mapping[str, Mapping[str, Any] | None]) -> tuple[str, Mapping[str, Any]] | None:
    """(node, detail): a replicated stream's or consumer's detail as its raft leader answers it ({node: that
    node's detail}): the leader tracks its followers (current: caught up with its applied index and heard from
    within nats-server's lost-quorum interval), a follower does not track the others. Without an answering
    leader: any node's."""
    return next(((n, d) for n, d in views.items() if d and (d.get("cluster") or {}).get("leader") == n), None) \
        or next(((n, d) for n, d in views.items() if d), None)


def _leader_view(views: Mapping[str, Mapping[str, Any] | None]) -> Mapping[str, Any] | None:
    got = _leader_answer(views)
    return got[1] if got else None


def _not_current(node: str, view: Mapping[str, Any], by: str) -> str | None:
    """Why ``node`` is not current on the asset ``view`` describes, as node ``by`` answered it (``_leader_view``);
    None when it is its leader, a current replica as its leader says, or holds no replica of it."""
    cluster = view.get("cluster")
    if not cluster:  # JetStream not clustered (one node): nothing to be behind
        return None
    leader = str(cluster.get("leader") or "")
    if node == leader and by == node:
        return None
    replica = next((r for r in cluster.get("replicas") or [] if r.get("name") == node), None)
    member = replica is not None or node in (leader, by)
    if not member:
        return None
    if not leader:
        return "it has no leader"
    if by != leader:  # only the leader tracks its followers; it does not answer (yet): nothing says it is current
        return f"its leader {leader} does not answer"
    if in_sync(replica):
        return None
    return f"behind its leader {leader} (lag {replica.get('lag', 0)}, " \
           f"{'offline' if replica.get('offline') else 'seen %.1fs ago' % (int(replica.get('active', 0)) / 1e9)})"


AssetView = tuple[str, Mapping[str, Any]]  # (the node that answered, its detail of a stream or consumer)


def node_serves(node: str, answer: Mapping[str, Any] | str, stream: str, stream_view: AssetView | None,
                consumer_views: Mapping[str, AssetView | None]) -> Check:
    """One node's ``nats-server /healthz`` check (module docstring): its ``/healthz?js-server-only=true`` is ok and
    it is current on the worker's stream and each of the worker's consumers it holds a replica of. The stream not
    created yet is said, not failed here (``nats stream`` fails it: the worker creates it on start)."""
    from iotplat.verify.status import Check

    if isinstance(answer, str):
        return Check(NODE_CHECK, False, f"not serving: {answer}", host=node)
    hz = answer.get(HEALTHZ) or {}
    if hz.get("status") != "ok":
        return Check(NODE_CHECK, False, f"{hz.get('status', 'no answer')}: {hz.get('error', '')} "
                                        f"(/healthz?js-server-only=true)".replace(":  (", " ("), host=node)
    leader = ((answer.get(MONITOR_PATHS[1]) or {}).get("meta_cluster") or {}).get("leader") or "this node"
    behind = []
    if stream_view is not None:
        why = _not_current(node, stream_view[1], stream_view[0])
        if why:
            behind.append(f"{stream}: {why}")
    for name, view in consumer_views.items():
        why = _not_current(node, view[1], view[0]) if view is not None else None
        if why:
            behind.append(f"consumer {name}: {why}")
    if behind:
        return Check(NODE_CHECK, False, "not current: " + "; ".join(behind), host=node)
    assets = [stream, *consumer_views] if stream_view is not None else []
    return Check(NODE_CHECK, True, f"ok: JetStream with meta leader {leader}; "
                 + (f"current on {', '.join(assets)}" if assets else f"{stream} not created yet"), host=node)


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
    seen = {n: _stream(a.get(MONITOR_PATHS[1]) or {}, stream) for n, a in up.items()}
    stream_view = _leader_answer(seen)
    detail = stream_view[1] if stream_view else None
    consumers: dict[str, dict[str, Mapping[str, Any]]] = {}  # the worker's durables: name -> {node: its answer}
    for n, d in seen.items():
        for c in (d or {}).get("consumer_detail") or []:
            if str(c.get("name", "")).startswith(WORKER_DURABLE_PREFIX + "_"):
                consumers.setdefault(str(c["name"]), {})[n] = c
    consumer_views = {name: _leader_answer(v) for name, v in sorted(consumers.items())}
    for n in nodes:
        out.append(node_serves(n, answers.get(n, "no answer"), stream, stream_view, consumer_views))
    if detail is None:
        out.append(Check(f"nats stream {stream}", False, "no answering node knows the stream (the worker creates it "
                                                           "on start)"))
        return out
    cluster = detail.get("cluster") or {}
    leader = cluster.get("leader", "")
    replicas = cluster.get("replicas") or []
    behind = sorted(r.get("name", "?") for r in replicas if not in_sync(r))
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


def stream_last_seq(jsz: Mapping[str, Any], stream: str = MQTT_STREAM) -> int | None:
    """The stream's last sequence number as this node knows it (None: the node does not hold the stream)."""
    detail = _stream(jsz, stream)
    return None if detail is None else int((detail.get("state") or {}).get("last_seq", 0))


def unacked_through(jsz: Mapping[str, Any], upto: int, durable_prefix: str = WORKER_DURABLE_PREFIX,
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


def leaders_needed(views: Mapping[str, Mapping[str, Any]], stream: str = MQTT_STREAM,
                   durable_prefix: str = WORKER_DURABLE_PREFIX) -> set[str]:
    """The nodes whose /jsz (``JSZ_CONSUMERS``) ``leaders_jsz`` still needs: the stream's leader and its worker
    consumers' leaders as the nodes in ``views`` ({node: its /jsz}) name them, minus those already read."""
    details = [d for d in (_stream(v, stream) for v in views.values()) if d]
    names = {str((d.get("cluster") or {}).get("leader") or "") for d in details}
    names |= {str((c.get("cluster") or {}).get("leader") or "") for d in details
              for c in d.get("consumer_detail") or [] if str(c.get("name", "")).startswith(durable_prefix + "_")}
    return names - {""} - set(views)


def leaders_jsz(views: Mapping[str, Mapping[str, Any]], stream: str = MQTT_STREAM,
                durable_prefix: str = WORKER_DURABLE_PREFIX) -> dict[str, Any]:
    """One /jsz of the worker's stream from several nodes' ({node: its /jsz}): the stream's state as its leader
    answers it (a follower may not have applied the newest messages yet: its last_seq would be too low) and each
    worker consumer as its own leader answers it (a follower's ack floor, pending and delivered counts trail the
    leader's), each falling back to any node's answer when its leader was not read."""
    seen = {n: _stream(v, stream) for n, v in views.items()}
    detail = _leader_view(seen)
    if detail is None:
        return {"account_details": []}
    by_name: dict[str, dict[str, Mapping[str, Any]]] = {}
    for n, d in seen.items():
        for c in (d or {}).get("consumer_detail") or []:
            if str(c.get("name", "")).startswith(durable_prefix + "_"):
                by_name.setdefault(str(c["name"]), {})[n] = c
    merged = {**detail, "consumer_detail": [_leader_view(v) for _, v in sorted(by_name.items())]}
    return {"account_details": [{"stream_detail": [merged]}]}


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


SETTLE = 10.0  # seconds `status` re-reads answering nodes whose JetStream state is not ok yet (an election)


def checks(probe: Probe) -> list[Check]:
    """Read each broker host's monitoring endpoints over SSH and judge the cluster (``cluster_checks``). While a
    check is red although every node answers (a raft election after a restart takes seconds), the nodes are read
    again every 2 s for ``SETTLE`` seconds at most, as `status` gives a worker replica's /healthz time to settle."""
    import json
    import subprocess
    import time

    from iotplat.services.nats import MONITOR_PORT
    from iotplat.verify.status import _ssh_json

    p = probe.platform
    nodes = list(p.placement["broker"])
    script = _SCRIPT % (json.dumps(list(MONITOR_PATHS)), MONITOR_PORT)

    def read() -> dict[str, Mapping[str, Any] | str]:
        answers: dict[str, Mapping[str, Any] | str] = {}
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
        return answers

    deadline = time.monotonic() + SETTLE
    while True:
        answers = read()
        out = cluster_checks(nodes, answers)
        if all(c.ok for c in out) or any(isinstance(a, str) for a in answers.values()) \
                or time.monotonic() >= deadline:
            return out
        time.sleep(2)
