#!/usr/bin/env python3
"""Benchmark helper: the worker's CPU instructions per message, end to end, under callgrind.

Not a test: it prints figures. CPU time on a shared 2-core virtual machine moves by ±25 % with what else
runs; the number of instructions the worker executes per message does not (within ~1 %), so this is the
figure to compare two versions of the worker with, and the one that says where the time goes.

    .venv/bin/python bench/worker_instructions.py                   # 20,000 messages, TCP and TLS
    .venv/bin/python bench/worker_instructions.py --messages 5000 --only-tcp

The worker runs as in bench/worker_throughput.py (real Mosquitto 2.0.11 with max_inflight_messages 5000,
real InfluxDB 1.6.7, native transport, the same JSON messages from 100 devices, batches of 5,000 / 0.2 s)
but inside ``valgrind --tool=callgrind``: about 50 times slower, so every thread's share of the work and
the batch sizes are not those of a real run (each read holds more messages), but the work per message is.
Counters are zeroed once a warm-up message is stored and dumped once every row is countable
(``callgrind_control``), so start-up is not counted. Instructions in the kernel (system calls) are not
counted by callgrind at all: the worker's system time (about 0.3 µs per message in
worker_throughput.py's runs) comes on top.

Printed: instructions per message in total and split by where they execute: the Python interpreter and
its objects (libpython), the C JSON scanner (_json), TLS (libssl/libcrypto), libc (malloc, memcpy), the
rest; plus the C functions with the most inclusive instructions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from support.servers import Influx1, Mosquitto, kill_group, wait_port  # noqa: E402
from support.workerproc import worker_config  # noqa: E402
from worker_throughput import publisher_result, start_publisher, wait_rows, warm_up  # noqa: E402

PY = sys.executable


def _objects(out: Path, total: int) -> dict[str, int]:
    """Exclusive instructions per shared object, from callgrind_annotate's per-function table. The frames
    that were on a thread's stack when the counters were zeroed show the whole total there; they are left
    out (their own share is small: they are loops that call everything else)."""
    text = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", str(out)], capture_output=True,
                          text=True, timeout=300).stdout
    per: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)\[(.*?)\]\s*$", line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        if ir >= 0.99 * total:
            continue
        obj = Path(m.group(3)).name
        per[obj] = per.get(obj, 0) + ir
    return per


def _top_inclusive(out: Path, k: int) -> list[tuple[int, str]]:
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=99", str(out)],
                          capture_output=True, text=True, timeout=300).stdout
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(\S+?)(?: \[.*\])?\s*$", line)
        if m:
            fn = m.group(2).split(":", 1)[-1]
            rows.append((int(m.group(1).replace(",", "")), fn))
    wanted = ("scanner_call", "float_repr", "PyObject_Format", "ssl_", "SSL_read", "SSL_write", "sock_recv",
              "sock_send", "select_select", "_PyObject_Malloc", "PyObject_Free", "bytes_join", "unicode_encode",
              "PyUnicode_Decode", "PyUnicode_AsEncodedString", "PyObject_GetItem", "_PyUnicode_JoinArray",
              "zlib", "crc32", "PyThread_acquire_lock", "take_gil", "drop_gil")
    seen, picked = set(), []
    for ir, fn in rows:
        if any(w in fn for w in wanted) and fn not in seen:
            seen.add(fn)
            picked.append((ir, fn))
    return picked[:k]


def run(n: int, tls: bool, keep: Path) -> dict:
    b, i = Mosquitto.start(max_inflight=5000), Influx1.start()
    tmp = Path(tempfile.mkdtemp(prefix="iotplat-bench-cg-"))
    proc = None
    try:
        cfg = worker_config(tmp, b, i, tls=tls, inflight=5000, max_points=5000, max_delay=0.2)
        out = tmp / "callgrind.out"
        log = open(tmp / "worker.log", "ab")
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                 PY, "-m", "iotplat.worker", "--config", str(cfg), "--replica", "1",
                                 "--transport", "native"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log, start_new_session=True, cwd=ROOT, text=True)
        log.close()
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if "ready" not in ready:
            raise RuntimeError(f"worker under valgrind did not start: {(tmp / 'worker.log').read_text()[-2000:]}")
        import tomllib
        wait_port(tomllib.loads(cfg.read_text())["http"]["port"], 60, proc=proc, what="worker http")
        warm_up(b, tls, i, "telemetry")
        time.sleep(1.0)  # let the warm-up batch's acks and the health thread's first point settle
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True, timeout=120)
        p = start_publisher(b.tls_port if tls else b.port, n, ca=str(b.ca["ca"]) if tls else "")
        wait_rows(i, "telemetry", n + 1, timeout=1800, poll=0.5)
        subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)], check=True, capture_output=True,
                       timeout=300)
        publisher_result(p)
        dumps = sorted(tmp.glob("callgrind.out*"), key=lambda f: f.stat().st_mtime)
        dumped = [d for d in dumps if d.name != "callgrind.out"]
        if not dumped:
            raise RuntimeError("callgrind_control produced no dump")
        total = 0
        for d in dumped:  # one file per thread with --separate-threads=no: one file
            m = re.search(r"^summary:\s+(\d+)", d.read_text(errors="replace"), re.M) or \
                re.search(r"^totals:\s+(\d+)", d.read_text(errors="replace"), re.M)
            total += int(m.group(1)) if m else 0
        target = keep / f"callgrind.worker.{'tls' if tls else 'tcp'}.out"
        shutil.copy(dumped[-1], target)
        return {"total": total, "objects": _objects(target, total), "top": _top_inclusive(target, 14), "file": target}
    finally:
        kill_group(proc)
        b.close()
        i.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--only-tcp", action="store_true")
    ap.add_argument("--keep", default=os.environ.get("TMPDIR", "/tmp"),
                    help="folder for the callgrind files (for callgrind_annotate / kcachegrind)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind not found (apt-get install valgrind)")
        return 1
    n = args.messages
    print(f"worker instructions per message under callgrind: {n:,} QoS 1 JSON messages; python "
          f"{sys.version.split()[0]}", flush=True)
    for tls in ((False,) if args.only_tcp else (False, True)):
        r = run(n, tls, Path(args.keep))
        print(f"\n{'TLS' if tls else 'TCP'}: {r['total'] / n:,.0f} instructions/msg (user space; {r['file']})",
              flush=True)
        groups = {"interpreter + objects (libpython)": 0, "JSON scanner (_json)": 0, "TLS (libssl, libcrypto)": 0,
                  "libc (malloc, memcpy, ...)": 0, "other": 0}
        for obj, ir in r["objects"].items():
            if obj.startswith("libpython") or obj.startswith("python3"):
                groups["interpreter + objects (libpython)"] += ir
            elif obj.startswith("_json"):
                groups["JSON scanner (_json)"] += ir
            elif obj.startswith("libssl") or obj.startswith("libcrypto") or obj.startswith("_ssl"):
                groups["TLS (libssl, libcrypto)"] += ir
            elif obj.startswith("libc.so") or obj.startswith("libc-"):
                groups["libc (malloc, memcpy, ...)"] += ir
            else:
                groups["other"] += ir
        for g, ir in groups.items():
            print(f"   {g:36s} {ir / n:8,.0f} /msg", flush=True)
        print(f"   {'(not attributed: frames active at the zeroing)':36s} "
              f"{(r['total'] - sum(groups.values())) / n:8,.0f} /msg", flush=True)
        print("   C functions (inclusive):", flush=True)
        for ir, fn in r["top"]:
            print(f"      {ir / n:8,.0f} /msg  {fn}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
