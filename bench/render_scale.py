"""Benchmark: validate + render a platform with N devices on 20 hosts, cold and warm.

    python bench/render_scale.py            # 1k, 10k, 100k devices (100k cold takes minutes: ~N x 5 ms / cores)
    python bench/render_scale.py --quick    # 1k and 10k only

cold = empty state directory: every device's password is generated and its PBKDF2 hash computed.
warm = the same spec again: everything comes from the (encrypted) state.
Baselines measured in the same run: the bare cost of the hashes (hashlib.pbkdf2_hmac on all cores) for
cold, and the bare cost of reading the spec and the CSV registry (validate only) for warm.
Targets: warm <= 1.5 s for 10k devices; warm grows linearly; cold bounded by the hash cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iotplat.commands import render, validate  # noqa: E402
from iotplat.secrets.passwords import hash_many  # noqa: E402

SPEC = """apiVersion: iotplat/v1
name: bench
target:
  kind: baremetal
  hosts:
{addresses}
hosts:
  - {{name: h01, services: [broker]}}
  - {{name: h02, services: [influxdb]}}
  - {{name: h03, services: [grafana]}}
{workers}
devices:
  registry: devices.csv
  topics:
    - site/{{site}}/device/{{device}}/telemetry
ingestion:
  replicas: 17
  peak_rate: 20000
  spool: {{max_size: 8GiB}}
  subscriptions:
    - name: telemetry
      topic: site/{{site}}/device/{{device}}/telemetry
      measurement: telemetry
      timestamp: {{field: ts, unit: ms}}
      fields: {{temperature: float, humidity: float}}
influxdb: {{version: 1}}
"""


def write_spec(folder: Path, devices: int) -> Path:
    hosts = [f"h{i:02d}" for i in range(1, 21)]
    addresses = "\n".join(f"    {h}: {{address: 192.0.2.{i + 1}}}" for i, h in enumerate(hosts))
    workers = "\n".join(f"  - {{name: {h}, services: [worker]}}" for h in hosts[3:])
    (folder / "platform.yaml").write_text(SPEC.format(addresses=addresses, workers=workers))
    with open(folder / "devices.csv", "w") as fh:
        fh.write("id,site\n")
        for i in range(devices):
            fh.write(f"dev-{i:06d},site-{i % 50:02d}\n")
    return folder / "platform.yaml"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip 100k devices")
    args = parser.parse_args()
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    work = Path(tempfile.mkdtemp(prefix="iotplat-bench-"))
    key = work / "key"
    key.write_text("bench-vault-password-0123456789abcdef")
    key.chmod(0o600)
    os.environ["IOTPLAT_VAULT_PASSWORD_FILE"] = str(key)
    print(f"iotplat render benchmark, {os.cpu_count()} cores; 20 hosts, 17 worker replicas, 10,000 PBKDF2 iterations")
    print(f"{'devices':>8} {'validate':>9} {'hash base':>10} {'cold':>8} {'cold/base':>9} {'warm':>7} {'warm/dev':>9}")
    rows = []
    try:
        for n in sizes:
            folder = work / f"n{n}"
            folder.mkdir()
            spec = write_spec(folder, n)
            os.environ["IOTPLAT_STATE_DIR"] = str(folder / "state")
            t_validate, _ = timed(validate, str(spec), None)
            sample = min(n, 2000)
            t_hash, _ = timed(hash_many, [(f"u{i}", "x" * 32) for i in range(sample)], 10_000)
            base = t_hash * n / sample
            t_cold, res = timed(render, str(spec), None, out_dir=str(folder / "build"))
            assert res["hashes_computed"] == n + 1 + 17, res["hashes_computed"]
            t_warm, res = timed(render, str(spec), None, out_dir=str(folder / "build"))
            assert res["hashes_computed"] == 0 and res["written"] == []
            rows.append((n, t_warm))
            print(f"{n:>8,} {t_validate:>8.2f}s {base:>9.1f}s {t_cold:>7.1f}s {t_cold / base:>8.2f}x {t_warm:>6.2f}s "
                  f"{t_warm / n * 1e6:>7.1f}µs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warm = dict(rows)
    ok = warm.get(10_000, 0) <= 1.5
    print(f"target warm <= 1.5 s at 10k devices: {'met' if ok else 'MISSED'} ({warm.get(10_000, 0):.2f} s)")
    if len(rows) >= 2:
        (n1, t1), (n2, t2) = rows[-2], rows[-1]
        print(f"warm growth {n1:,} -> {n2:,} devices: x{t2 / t1:.1f} for x{n2 / n1:.0f} devices "
              f"({'linear or better' if t2 / t1 <= (n2 / n1) * 1.2 else 'SUPERLINEAR'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
