#!/usr/bin/env python3
"""Benchmark: messages per second end to end (devices publish QoS 1 -> broker -> worker -> InfluxDB) on one
Mosquitto, one NATS node and a 3-node NATS cluster, in the same run; the cost of replication as a ratio.

Not a test: it prints figures and the ratios between the three set-ups measured in this run.

    .venv/bin/python bench/broker_throughput.py                     # 60,000 messages, 3 runs each (interleaved)
    .venv/bin/python bench/broker_throughput.py --messages 20000 --runs 1     # a quick look

Every set-up gets the same load: 3 publisher processes with --conns device connections each (default 10:
30 devices; tests/support/mqttload.py, raw-socket QoS 1, MQTT 3.1.1 over TLS, each device its own
credential and, on NATS, its own permission), all sending at once as fast as the broker acknowledges; on the
cluster each process talks to another node. NATS's MQTT layer handles one connection's PUBLISHes one after
the other and acknowledges each only after JetStream stored it (on 3 nodes: after a Raft round), so one
connection's rate is bounded by that round trip and the fleet's rate grows with the number of devices. The same worker
(one replica, inflight 5,000, batches of 5,000 points or 0.2 s, spool in outage mode) writes to a fresh
InfluxDB 1.6.7 each run; the time is from the first publish to the last row countable in InfluxDB.

- mosquitto: Debian's 2.0.11, max_inflight_messages 5000, persistence on (tests/support/servers.py); the
  worker's native MQTT transport (MQTT 5, TLS).
- nats-1 / nats-3: Debian's nats-server 2.9.10 rendered by iotplat.nats.config: TLS on every listener,
  bcrypt users, JetStream; the MQTT layer stores every QoS 1 message in $MQTT_msgs (R1 on one node, R3 on
  three) before its PUBACK; the worker's NATS transport pulls it through its durable consumer (TLS).

Besides the rate it reports CPU seconds per message of the broker process(es), the worker and the
publishers, from /proc, over the same interval: on 2 cores shared by everything (and by other jobs on this
machine) the rate says more about the machine than about the broker, CPU per message says what it costs.
The load average is printed before and after each run. Every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support.natscluster import NatsCluster, nats_worker_config  # noqa: E402
from support.procstat import cpu_seconds, load  # noqa: E402
from support.servers import Influx1, Mosquitto, kill_group  # noqa: E402
from support.workerproc import WorkerProc, worker_config  # noqa: E402


PY = sys.executable
PUBLISHERS = 3
PASSWORD = "device-{:03d}-secret-pw-0123456789"  # tests/support/natscluster.py gives devices these


def child_publish(args: argparse.Namespace) -> None:
    """``--conns`` device connections in threads, each publishing its share for its own device."""
    import threading

    from support.mqttload import LoadPublisher

    base = args.base
    pubs, shares = [], []
    for c in range(args.conns):
        d = args.first_device + c
        seqs = range(args.seq0 + c, args.seq0 + args.n, args.conns)
        shares.append([(f"devices/dev{d:03d}/telemetry", b'{"ts":%d,"seq":%d,"temp":%.2f}' % (base + q, q, 20.5))
                       for q in seqs])
        user = f"dev{d:03d}"  # every device its own credential (and on NATS its own permission)
        p = LoadPublisher(args.port, user, PASSWORD.format(d), user, ca_file=args.ca, window=max(10, 1000 // args.conns))
        p.connect()
        pubs.append(p)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # go
    errors: list[BaseException] = []

    def run(p: LoadPublisher, msgs: list) -> None:
        try:
            p.publish_all(msgs, timeout=900)
        except BaseException as e:  # reported below
            errors.append(e)

    t0 = time.time()
    threads = [threading.Thread(target=run, args=(p, m)) for p, m in zip(pubs, shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.time()
    for p in pubs:
        p.disconnect()
    if errors:
        raise errors[0]
    print(json.dumps({"t_first": t0, "t_last_ack": t1}), flush=True)


def start_publishers(ports: list[int], ca: str, n: int, base: int, conns: int = 1) -> list[subprocess.Popen]:
    procs = []
    per = n // PUBLISHERS
    for k in range(PUBLISHERS):
        count = per if k < PUBLISHERS - 1 else n - per * (PUBLISHERS - 1)
        procs.append(subprocess.Popen(
            [PY, __file__, "--child", "--port", str(ports[k % len(ports)]), "--ca", ca, "--n", str(count), "--seq0", str(k * per), "--first-device", str(k * conns), "--conns", str(conns),
             "--base", str(base)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True))
    for p in procs:
        line = p.stdout.readline()  # type: ignore[union-attr]
        if "ready" not in line:
            raise RuntimeError(f"publisher did not connect: {line!r}")
    return procs


def go(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]


def finish(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=900)
        lines = [x for x in text.splitlines() if x.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"publisher failed ({p.returncode}): {text[-300:]}")
        out.append(json.loads(lines[-1]))
    return out


def wait_rows(influx: Influx1, n: int, timeout: float = 900) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if influx.count("telemetry", "seq") >= n:
            return time.time()
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {n} rows after {timeout}s ({influx.count('telemetry', 'seq')})")


def warm_up(ports: list[int], ca: str, influx: Influx1) -> None:
    """One message through the whole path (re-sent until it is a row), so timing starts warm."""
    base = int(time.time() * 1000) - 50_000_000
    deadline = time.monotonic() + 120
    while True:
        procs = start_publishers(ports[:1], ca, PUBLISHERS, base)
        go(procs)
        finish(procs)
        try:
            wait_rows(influx, PUBLISHERS, timeout=5)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def measure(kind: str, n: int, conns: int) -> dict:
    influx = Influx1.start()
    tmp = Path(tempfile.mkdtemp(prefix="iotplat-bench-broker-"))
    mosq = cluster = worker = None
    procs: list[subprocess.Popen] = []
    try:
        if kind == "mosquitto":
            mosq = Mosquitto.start(max_inflight=5000, users={f"dev{d:03d}": PASSWORD.format(d)
                                                             for d in range(PUBLISHERS * conns)})
            ports, ca = [mosq.tls_port], str(mosq.ca["ca"])
            cfg = worker_config(tmp, mosq, influx, tls=True, inflight=5000, max_points=5000, max_delay=0.2)
            worker = WorkerProc(cfg, transport="native").start(timeout=60)
            broker_pids = [mosq.proc.pid]  # type: ignore[union-attr]
        else:
            size = 1 if kind == "nats-1" else 3
            own = kind.endswith("own-stream")
            stream = {"stream": "IOTPLAT_TELEMETRY", "subject_prefix": ""} if own else {}
            cluster = NatsCluster.start(size, devices=PUBLISHERS * conns, workers=1, **stream)
            ports, ca = [n_.mqtt_port for n_ in cluster.nodes], cluster.ca_file
            assert cluster.passwords["dev000"] == PASSWORD.format(0)
            cfg = nats_worker_config(tmp, cluster, influx, inflight=5000, replicas=1, ack_wait=30.0, max_points=5000,
                                     max_delay=0.2, nats_extra=stream)
            worker = WorkerProc(cfg).start(timeout=60)
            broker_pids = [n_.proc.pid for n_ in cluster.nodes]  # type: ignore[union-attr]
        warm_up(ports, ca, influx)
        base = int(time.time() * 1000) - 10_000_000
        procs = start_publishers(ports, ca, n, base, conns)
        load0 = load()
        b0 = sum(cpu_seconds(p) for p in broker_pids)
        w0 = cpu_seconds(worker.pid)
        p0 = sum(cpu_seconds(p.pid) for p in procs)
        go(procs)
        t_end = wait_rows(influx, n + PUBLISHERS)
        b1 = sum(cpu_seconds(p) for p in broker_pids)
        w1 = cpu_seconds(worker.pid)
        p1 = sum(cpu_seconds(p.pid) for p in procs)
        res = finish(procs)
        t0 = min(r["t_first"] for r in res)
        secs = t_end - t0
        m = worker.metrics()
        return {"kind": kind, "rate": n / secs, "secs": secs, "broker_us": (b1 - b0) * 1e6 / n,
                "worker_us": (w1 - w0) * 1e6 / n, "pub_us": (p1 - p0) * 1e6 / n,
                "pub_rate": n / (max(r["t_last_ack"] for r in res) - t0),
                "redeliveries": m.get("iotplat_worker_redeliveries_total", 0), "load": f"{load0} -> {load()}"}
    finally:
        for p in procs:
            kill_group(p)
        if worker is not None:
            worker.close()
        if mosq is not None:
            mosq.close()
        if cluster is not None:
            cluster.close()
        influx.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=60_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=("mosquitto", "nats-1", "nats-3", "nats-3-own-stream"), action="append",
                    help="run only these set-ups; nats-3-own-stream: the worker consumes a stream of its own "
                         "(limits retention, subjects devices.*.telemetry) instead of $MQTT_msgs (see docs/broker-engines.md)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--port", type=int)
    ap.add_argument("--ca", default="")
    ap.add_argument("--n", type=int)
    ap.add_argument("--seq0", type=int, default=0)
    ap.add_argument("--first-device", type=int, default=0)
    ap.add_argument("--conns", type=int, default=10, help="device connections per publisher process")
    ap.add_argument("--base", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        child_publish(args)
        return 0
    kinds = args.only or ["mosquitto", "nats-1", "nats-3"]
    print(f"broker throughput: {args.messages:,} QoS 1 messages from {PUBLISHERS * args.conns} device connections "
          f"({PUBLISHERS} publisher processes, TLS, windows of {max(10, 1000 // args.conns)}), "
          f"1 worker replica -> InfluxDB 1.6.7; {args.runs} run(s) each, interleaved; {os.cpu_count()} cores; "
          f"load average {load()}", flush=True)
    print("   CPU/msg: user+system seconds of the broker process(es), the worker and the publishers over the run, "
          "per message", flush=True)
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for run in range(args.runs):
        for kind in kinds:
            r = measure(kind, args.messages, args.conns)
            results[kind].append(r)
            print(f"   run {run + 1} {kind:9s} {r['rate']:8,.0f} msg/s end to end ({r['secs']:.1f} s; publishers "
                  f"acked at {r['pub_rate']:,.0f}/s)  broker {r['broker_us']:6.1f} µs/msg  worker {r['worker_us']:5.1f}"
                  f" µs/msg  publishers {r['pub_us']:5.1f} µs/msg  redeliveries {r['redeliveries']:.0f}  "
                  f"load {r['load']}", flush=True)
    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("rate", "broker_us", "worker_us", "pub_us")}
           for k, rs in results.items()}
    print("\nmedians:", flush=True)
    for k, m in med.items():
        print(f"   {k:9s} {m['rate']:8,.0f} msg/s  broker {m['broker_us']:6.1f} µs/msg  worker {m['worker_us']:5.1f}"
              f" µs/msg  publishers {m['pub_us']:5.1f} µs/msg", flush=True)
    if "nats-1" in med and "nats-3" in med:
        print(f"   replication (nats-3 / nats-1): rate x{med['nats-3']['rate'] / med['nats-1']['rate']:.2f}, "
              f"broker CPU per message x{med['nats-3']['broker_us'] / med['nats-1']['broker_us']:.2f}", flush=True)
    if "mosquitto" in med and "nats-1" in med:
        print(f"   nats-1 / mosquitto: rate x{med['nats-1']['rate'] / med['mosquitto']['rate']:.2f}, broker CPU per "
              f"message x{med['nats-1']['broker_us'] / med['mosquitto']['broker_us']:.2f}, worker CPU per message "
              f"x{med['nats-1']['worker_us'] / med['mosquitto']['worker_us']:.2f}", flush=True)
    print(f"load average at the end {load()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
