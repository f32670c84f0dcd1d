#!/usr/bin/env python3
"""Benchmark: the iotplat worker vs the broker's own QoS 1 pass-through vs Node-RED, on this machine.

Not a test: it prints figures and compares them with baselines measured in the same run.

    .venv/bin/python bench/worker_throughput.py                # full: 200,000 msgs x 3 runs x {tcp,tls}
    .venv/bin/python bench/worker_throughput.py --messages 50000 --runs 1   # quick look

What it measures (every server is started fresh for every run, on random loopback ports):
  1. client-only consumption (TCP): how fast each MQTT client layer can take QoS 1 messages with
     in-order, non-optimistic acks and no other work: the worker's native client, paho-mqtt
     (manual_ack=True), gmqtt (optimistic_acknowledgement=False, an async handler per message);
  2. for TCP and TLS, 3 runs each, 200,000 QoS 1 JSON messages from first publish until
       - broker: a bare subscriber (the native client, acking at once) has received them all,
       - node-red: every row is countable in InfluxDB (mqtt in -> json -> batching function ->
         influxdb batch out; npm node-red + node-red-contrib-influxdb installed under /tmp),
       - worker: every row is countable in InfluxDB (iotplat worker, native transport, spool in
         outage mode, at-least-once: acks only after the write);
     medians, ratios, the worker's CPU µs/msg and peak RSS;
  3. publish-to-queryable latency at a steady 5,000 msg/s (p50/p99; InfluxDB polled every 50 ms,
     so the figures are upper bounds);
  4. spool drain rate: InfluxDB stopped, messages spooled (and acked), InfluxDB started, time until
     every row is countable.
The load publisher (tests/support/mqttload.py) runs in its own process: a raw-socket QoS 1
publisher with a bounded window (mosquitto_pub -l exits before its QoS 1 queue drains; paho as a
publisher reuses packet ids past 65,535 queued messages).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support.servers import Influx1, Mosquitto, free_port, kill_group, wait_port  # noqa: E402
from support.workerproc import WorkerProc, worker_config  # noqa: E402

PY = sys.executable
NODERED_DIR = Path(os.environ.get("IOTPLAT_NODERED_DIR", "/tmp/iotplat-nodered"))


def messages(n: int, devices: int = 100, rate_base: int | None = None):
    base = rate_base if rate_base is not None else int(time.time() * 1000) - n - 120_000
    for seq in range(n):
        yield (f"devices/dev{seq % devices:03d}/telemetry",
               b'{"ts":%d,"seq":%d,"temp":%.2f}' % (base + seq, seq, 20 + (seq % 100) / 10))


# ----------------------------------------------------------------------------------- children

def child_publish(args: argparse.Namespace) -> None:
    from support.mqttload import LoadPublisher

    msgs = list(messages(args.n, rate_base=args.base))
    p = LoadPublisher(args.port, "device", "device-secret-pw", "device", ca_file=args.ca or None, window=5000)
    p.connect()
    sent_at: list[float] = []
    on_sent = (lambda i, pid, t: sent_at.append(time.time())) if args.times else None
    t0 = time.time()
    p.publish_all(msgs, rate=args.rate or None, timeout=900, on_sent=on_sent)
    t1 = time.time()
    p.disconnect()
    out = {"t_first": t0, "t_last_ack": t1, "n": args.n}
    if args.times:
        Path(args.times).write_text(json.dumps(sent_at))
    print(json.dumps(out), flush=True)


def child_consume(args: argparse.Namespace) -> None:
    """A bare consumer with in-order acks, no other work. Prints {"t_done":..., "cpu":...} when n arrived."""
    n, user, pw = args.n, args.user, args.password
    done = threading.Event()
    if args.kind == "native":
        from iotplat.worker.config import MqttConfig
        from iotplat.worker.mqtt_native import NativeTransport

        class H:
            count = 0
            pend: list = []

            def on_connected(self, sp): tr.subscribe(["devices/+/telemetry"])
            def on_subscribed(self, g): print(json.dumps({"ready": True}), flush=True)
            def on_message(self, topic, payload, dup, tok):
                self.pend.append(tok)
                self.count += 1
                if len(self.pend) >= 200 or self.count >= n:
                    tr.ack(self.pend)
                    self.pend = []
                if self.count >= n:
                    done.set()
            def on_disconnected(self, r): pass
            def on_connect_failed(self, r): print(json.dumps({"error": r}), flush=True)

        cfg = MqttConfig("127.0.0.1", args.port, 5, "tcp", bool(args.ca), args.ca or "", "", user, pw, user, 30,
                         3600, "", 5000, 0.2, 2.0)
        tr = NativeTransport(cfg, H())
        tr.start()
        done.wait(900)
        t = time.time()
        tr.stop()
    elif args.kind == "paho":
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5, manual_ack=True)
        c.username_pw_set(user, pw)
        if args.ca:
            c.tls_set(ca_certs=args.ca)
        state = {"n": 0, "pend": []}

        def on_connect(cl, u, f, rc, p):
            cl.subscribe("devices/+/telemetry", qos=1)

        def on_subscribe(cl, u, mid, rcs, p):
            print(json.dumps({"ready": True}), flush=True)

        def on_message(cl, u, msg):
            state["pend"].append(msg.mid)
            state["n"] += 1
            if len(state["pend"]) >= 200 or state["n"] >= n:
                for mid in state["pend"]:
                    cl.ack(mid, 1)
                state["pend"] = []
            if state["n"] >= n:
                done.set()

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 5000
        c.connect("127.0.0.1", args.port, 30, clean_start=False, properties=props)
        c.loop_start()
        done.wait(900)
        t = time.time()
        c.disconnect()
        c.loop_stop()
    else:  # gmqtt, optimistic acknowledgement off: PUBACK when the async handler finishes
        import asyncio

        import gmqtt

        async def main() -> float:
            loop = asyncio.get_running_loop()
            state = {"n": 0, "fut": loop.create_future()}
            finished = asyncio.Event()

            async def flusher():
                while not finished.is_set():
                    await asyncio.sleep(0.02)
                    f, state["fut"] = state["fut"], loop.create_future()
                    f.set_result(None)

            async def on_message(client, topic, payload, qos, properties):
                state["n"] += 1
                if state["n"] >= n:
                    finished.set()
                await state["fut"]  # "written": acked when the batch is flushed
                return 0

            def on_subscribe(client, mid, qos, properties):
                print(json.dumps({"ready": True}), flush=True)

            c = gmqtt.Client(user, clean_session=False, optimistic_acknowledgement=False,
                             session_expiry_interval=3600, receive_maximum=5000)
            c.set_auth_credentials(user, pw)
            c.on_message = on_message
            c.on_subscribe = on_subscribe
            ssl_ctx = False
            if args.ca:
                import ssl
                ssl_ctx = ssl.create_default_context(cafile=args.ca)
            await c.connect("127.0.0.1", args.port, ssl=ssl_ctx, version=gmqtt.constants.MQTTv50, keepalive=30)
            c.subscribe("devices/+/telemetry", qos=1)
            fl = asyncio.create_task(flusher())
            await asyncio.wait_for(finished.wait(), 900)
            t_done = time.time()
            await asyncio.sleep(0.1)
            fl.cancel()
            await c.disconnect()
            return t_done

        t = asyncio.run(main())
    ru = os.times()
    print(json.dumps({"t_done": t, "cpu": ru.user + ru.system}), flush=True)


# ----------------------------------------------------------------------------------- helpers

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_publisher(port: int, n: int, ca: str = "", rate: float = 0, times: str = "", base: int | None = None):
    cmd = [PY, __file__, "--child", "publish", "--port", str(port), "--n", str(n), "--ca", ca, "--rate", str(rate),
           "--times", times]
    if base is not None:
        cmd += ["--base", str(base)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)


def publisher_result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=900)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"publisher failed ({p.returncode}): {out[-500:]}")
    return json.loads(lines[-1])


def wait_rows(influx: Influx1, measurement: str, n: int, timeout: float = 600, poll: float = 0.1) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if influx.count(measurement, "seq") >= n:
            return time.time()
        time.sleep(poll)
    raise TimeoutError(f"{measurement}: fewer than {n} rows after {timeout}s ({influx.count(measurement, 'seq')})")


def warm_up(broker: Mosquitto, tls: bool, influx: Influx1 | None, measurement: str) -> None:
    """One message through the whole path, so timing starts with everything connected and subscribed.
    Re-sent until it is stored (a subscriber that is not subscribed yet misses it); every copy is the
    same point (same device, seq and timestamp), so it is always exactly one row."""
    base = int(time.time() * 1000) - 10_000_000
    deadline = time.monotonic() + 90
    while True:
        p = start_publisher(broker.tls_port if tls else broker.port, 1, ca=str(broker.ca["ca"]) if tls else "",
                            base=base)
        publisher_result(p)
        if influx is None:
            return
        try:
            wait_rows(influx, measurement, 1, timeout=3)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


# ----------------------------------------------------------------------------------- scenarios

def run_broker(n: int, tls: bool, kind: str = "native") -> dict:
    b = Mosquitto.start(max_inflight=5000)
    try:
        port = b.tls_port if tls else b.port
        ca = str(b.ca["ca"]) if tls else ""
        c = subprocess.Popen([PY, __file__, "--child", "consume", "--kind", kind, "--port", str(port), "--n", str(n),
                              "--ca", ca, "--user", "worker-1", "--password", b.users["worker-1"]],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert c.stdout is not None
        first = json.loads(c.stdout.readline())
        if "ready" not in first:
            raise RuntimeError(f"consumer: {first}")
        time.sleep(0.3)
        p = start_publisher(port, n, ca=ca)
        pub = publisher_result(p)
        res = json.loads(c.stdout.readline())
        c.wait(60)
        secs = res["t_done"] - pub["t_first"]
        return {"rate": n / secs, "secs": secs, "cpu_us": res["cpu"] * 1e6 / n}
    finally:
        b.close()


def run_worker(n: int, tls: bool, transport: str = "native", tmp: Path | None = None) -> dict:
    b, i = Mosquitto.start(max_inflight=5000), Influx1.start()
    tmp = Path(tempfile.mkdtemp(prefix="iotplat-bench-"))
    w = None
    try:
        cfg = worker_config(tmp, b, i, tls=tls, inflight=5000, max_points=5000, max_delay=0.2)
        w = WorkerProc(cfg, transport=transport).start()
        warm_up(b, tls, i, "telemetry")
        cpu0 = cpu_seconds(w.pid)
        p = start_publisher(b.tls_port if tls else b.port, n, ca=str(b.ca["ca"]) if tls else "")
        t_end = wait_rows(i, "telemetry", n + 1)
        pub = publisher_result(p)
        cpu = cpu_seconds(w.pid) - cpu0
        secs = t_end - pub["t_first"]
        m = w.metrics()
        return {"rate": n / secs, "secs": secs, "cpu_us": cpu * 1e6 / n, "rss_mb": peak_rss_mb(w.pid),
                "redeliveries": m["iotplat_worker_redeliveries_total"]}
    finally:
        if w is not None:
            w.close()
        b.close()
        i.close()
        shutil.rmtree(tmp, ignore_errors=True)


NODERED_FLOW_FN = """
let buf = context.get('buf') || [];
const p = msg.payload;
buf.push({measurement: 'telemetry', tags: {device: msg.topic.split('/')[1]},
          fields: {seq: p.seq, temp: p.temp}, timestamp: p.ts});
if (buf.length >= 5000) {
    context.set('buf', []);
    node.send({payload: buf});
    return null;
}
context.set('buf', buf);
if (!context.get('timer')) {
    context.set('timer', setTimeout(function () {
        context.set('timer', null);
        const b = context.get('buf') || [];
        context.set('buf', []);
        if (b.length) node.send({payload: b});
    }, 200));
}
return null;
"""


def nodered_available() -> bool:
    return (NODERED_DIR / "node_modules" / "node-red" / "red.js").exists() and \
        (NODERED_DIR / "node_modules" / "node-red-contrib-influxdb").exists() and shutil.which("node") is not None


def run_nodered(n: int, tls: bool) -> dict:
    b, i = Mosquitto.start(max_inflight=5000), Influx1.start()
    d = Path(tempfile.mkdtemp(prefix="iotplat-nodered-run-"))
    proc = None
    try:
        ui_port = free_port()
        flows = [
            {"id": "tab1", "type": "tab", "label": "bench"},
            {"id": "broker1", "type": "mqtt-broker", "name": "mosquitto", "broker": "127.0.0.1",
             "port": str(b.tls_port if tls else b.port), "clientid": "worker-3", "usetls": tls,
             "tls": "tls1" if tls else "", "protocolVersion": "4", "keepalive": "30", "cleansession": False,
             "autoConnect": True},
            {"id": "tls1", "type": "tls-config", "name": "ca", "cert": "", "key": "", "ca": str(b.ca["ca"]),
             "verifyservercert": True, "servername": ""},
            {"id": "in1", "type": "mqtt in", "z": "tab1", "name": "", "topic": "devices/+/telemetry", "qos": "1",
             "datatype": "utf8", "broker": "broker1", "nl": False, "rap": False, "inputs": 0,
             "wires": [["json1"]]},
            {"id": "json1", "type": "json", "z": "tab1", "property": "payload", "action": "obj",
             "wires": [["fn1"]]},
            {"id": "fn1", "type": "function", "z": "tab1", "name": "batch", "func": NODERED_FLOW_FN, "outputs": 1,
             "wires": [["out1"]]},
            {"id": "influx1", "type": "influxdb", "hostname": "127.0.0.1", "port": str(i.port), "protocol": "http",
             "database": i.database, "name": "influx", "usetls": False, "influxdbVersion": "1.x"},
            {"id": "out1", "type": "influxdb batch", "z": "tab1", "influxdb": "influx1", "precision": "ms",
             "retentionPolicy": i.rp, "name": "", "wires": []},
        ]
        (d / "flows.json").write_text(json.dumps(flows))
        (d / "flows_cred.json").write_text(json.dumps({
            "broker1": {"user": "worker-3", "password": b.users["worker-3"]},
            "influx1": {"username": i.worker[0], "password": i.worker[1]}}))
        (d / "settings.js").write_text(
            "module.exports = {uiHost: '127.0.0.1', uiPort: %d, flowFile: 'flows.json', credentialSecret: false, "
            "httpAdminRoot: '/admin', httpNodeRoot: false, logging: {console: {level: 'warn'}}, "
            "editorTheme: {tours: false}, telemetry: {enabled: false}, externalModules: {autoInstall: false}};\n"
            % ui_port)
        log = open(d / "nodered.log", "ab")
        proc = subprocess.Popen(["node", str(NODERED_DIR / "node_modules" / "node-red" / "red.js"), "--userDir",
                                 str(d), "--settings", str(d / "settings.js")], cwd=str(NODERED_DIR),
                                stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_port(ui_port, 60, proc=proc, what="node-red")
        try:
            warm_up(b, tls, i, "telemetry")
        except TimeoutError:
            raise RuntimeError("node-red did not store the warm-up message; its log:\n"
                               + (d / "nodered.log").read_text(errors="replace")[-3000:]) from None
        p = start_publisher(b.tls_port if tls else b.port, n, ca=str(b.ca["ca"]) if tls else "")
        t_end = wait_rows(i, "telemetry", n + 1)
        pub = publisher_result(p)
        secs = t_end - pub["t_first"]
        return {"rate": n / secs, "secs": secs, "rss_mb": peak_rss_mb(proc.pid)}
    finally:
        kill_group(proc)
        b.close()
        i.close()
        shutil.rmtree(d, ignore_errors=True)


def run_latency(rate: int, seconds: int) -> dict:
    b, i = Mosquitto.start(max_inflight=5000), Influx1.start()
    tmp = Path(tempfile.mkdtemp(prefix="iotplat-bench-"))
    w = None
    try:
        cfg = worker_config(tmp, b, i, inflight=5000, max_points=5000, max_delay=0.2)
        w = WorkerProc(cfg).start()
        warm_up(b, False, i, "telemetry")
        n = rate * seconds
        seen: list[tuple[float, int]] = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                t = time.time()
                seen.append((t, i.count("telemetry", "seq") - 1))
                time.sleep(0.05)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        times = tmp / "sent.json"
        p = start_publisher(b.port, n, rate=rate, times=str(times))
        wait_rows(i, "telemetry", n + 1)
        publisher_result(p)
        time.sleep(0.2)
        stop.set()
        th.join()
        sent = json.loads(times.read_text())
        lat = []
        j = 0
        for k, ts in enumerate(sent):  # row k is queryable at the first poll that counts > k rows
            while j < len(seen) and seen[j][1] <= k:
                j += 1
            if j < len(seen):
                lat.append(seen[j][0] - ts)
        lat.sort()
        return {"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "max": lat[-1], "n": len(lat),
                "rss_mb": peak_rss_mb(w.pid)}
    finally:
        if w is not None:
            w.close()
        b.close()
        i.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_drain(n: int) -> dict:
    b, i = Mosquitto.start(max_inflight=5000), Influx1.start()
    tmp = Path(tempfile.mkdtemp(prefix="iotplat-bench-"))
    w = None
    try:
        cfg = worker_config(tmp, b, i, inflight=5000, max_points=5000, max_delay=0.2, spool_max=1 << 30,
                            segment=16 << 20)
        w = WorkerProc(cfg).start()
        warm_up(b, False, i, "telemetry")
        i.stop(signal.SIGTERM)
        rss0 = peak_rss_mb(w.pid)
        t0 = time.time()
        p = start_publisher(b.port, n)
        pub = publisher_result(p)
        w.wait_metric("iotplat_worker_points_spooled_total", n, timeout=300)
        t_spooled = time.time()
        spool_peak = w.metrics()["iotplat_worker_spool_bytes"]
        i.launch()
        t1 = time.time()
        t_end = wait_rows(i, "telemetry", n + 1)
        return {"drain_rate": n / (t_end - t1), "drain_s": t_end - t1, "spool_rate": n / (t_spooled - t0),
                "spool_mb": spool_peak / 1e6, "rss_mb": peak_rss_mb(w.pid), "rss_before_mb": rss0,
                "pub": pub["n"]}
    finally:
        if w is not None:
            w.close()
        b.close()
        i.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- main

def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-nodered", action="store_true")
    ap.add_argument("--latency-rate", type=int, default=5000)
    ap.add_argument("--latency-seconds", type=int, default=20)
    ap.add_argument("--drain-messages", type=int, default=150_000)
    ap.add_argument("--child", choices=("publish", "consume"))
    ap.add_argument("--kind", default="native")
    ap.add_argument("--port", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--ca", default="")
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--times", default="")
    ap.add_argument("--base", type=int, default=None)
    ap.add_argument("--user", default="")
    ap.add_argument("--password", default="")
    args = ap.parse_args()
    if args.child == "publish":
        child_publish(args)
        return 0
    if args.child == "consume":
        child_consume(args)
        return 0

    n, runs = args.messages, args.runs
    print(f"iotplat worker benchmark: {n:,} QoS 1 JSON messages, {runs} run(s) each; {os.cpu_count()} cores; "
          f"mosquitto 2.0.11, influxdb 1.6.7", flush=True)

    print("\n1. client-only consumption, TCP, in-order non-optimistic acks, no other work (1 run each):", flush=True)
    for kind in ("native", "paho", "gmqtt"):
        try:
            r = run_broker(n, False, kind)
            print(f"   {kind:7s} {r['rate']:9,.0f} msg/s   {r['cpu_us']:5.1f} µs CPU/msg", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"   {kind:7s} failed: {e}", flush=True)

    use_nr = not args.skip_nodered and nodered_available()
    if not args.skip_nodered and not use_nr:
        print(f"\n(node-red not found under {NODERED_DIR}; install it there: cd {NODERED_DIR} && "
              "npm install node-red@4.1.1 node-red-contrib-influxdb@0.7.0)")
    summary = {}
    for tls in (False, True):
        name = "TLS" if tls else "TCP"
        res: dict[str, list[dict]] = {"broker": [], "node-red": [], "worker": []}
        print(f"\n2. {name}: first publish -> all received (broker) / all countable in InfluxDB", flush=True)
        for r in range(runs):
            res["broker"].append(run_broker(n, tls))
            if use_nr:
                res["node-red"].append(run_nodered(n, tls))
            res["worker"].append(run_worker(n, tls))
            line = f"   run {r + 1}: broker {res['broker'][-1]['rate']:8,.0f}/s"
            if use_nr:
                line += f"   node-red {res['node-red'][-1]['rate']:8,.0f}/s"
            line += (f"   worker {res['worker'][-1]['rate']:8,.0f}/s ({res['worker'][-1]['cpu_us']:.1f} µs CPU/msg, "
                     f"RSS {res['worker'][-1]['rss_mb']:.0f} MB)")
            print(line, flush=True)
        mb = med([x["rate"] for x in res["broker"]])
        mw = med([x["rate"] for x in res["worker"]])
        mn = med([x["rate"] for x in res["node-red"]]) if use_nr else float("nan")
        cpu = med([x["cpu_us"] for x in res["worker"]])
        rss = max(x["rss_mb"] for x in res["worker"])
        summary[name] = (mb, mn, mw)
        print(f"   median: broker {mb:,.0f}/s   node-red {mn:,.0f}/s   worker {mw:,.0f}/s", flush=True)
        print(f"   worker/broker = {mw / mb:.2f} (target >= 0.60)   worker/node-red = {mw / mn:.2f} (target >= 1.50)"
              f"   worker CPU {cpu:.1f} µs/msg   worker peak RSS {rss:.0f} MB (target <= 150)", flush=True)

    print(f"\n3. latency at a steady {args.latency_rate:,} msg/s for {args.latency_seconds} s (publish -> queryable):",
          flush=True)
    lat = run_latency(args.latency_rate, args.latency_seconds)
    print(f"   p50 {lat['p50']:.3f} s   p99 {lat['p99']:.3f} s (target <= 1.5)   max {lat['max']:.3f} s   "
          f"RSS {lat['rss_mb']:.0f} MB", flush=True)

    print(f"\n4. spool: InfluxDB down, {args.drain_messages:,} messages spooled (acked), InfluxDB back:", flush=True)
    d = run_drain(args.drain_messages)
    print(f"   spooled at {d['spool_rate']:,.0f} msg/s, spool {d['spool_mb']:.1f} MB; drained at "
          f"{d['drain_rate']:,.0f} msg/s = {d['drain_rate'] / args.latency_rate:.1f} x the steady "
          f"{args.latency_rate:,} msg/s (target >= 3)   RSS {d['rss_before_mb']:.0f} -> {d['rss_mb']:.0f} MB",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
