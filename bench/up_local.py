"""Benchmark: wall time of `iotplat up` for the 3-host local platform, then of a no-change re-run.

    sudo .venv/bin/python bench/up_local.py

Baseline measured in the same run: `ansible -m ping` of the same hosts (the fixed cost of reaching them), and the
render alone. Target: a no-change re-run under 30 s. Hosts are created on 10.217.0.0/24 and removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from iotplat.cli import main  # noqa: E402


def timed(*args: str) -> tuple[float, int]:
    t = time.perf_counter()
    code = main(list(args))
    return time.perf_counter() - t, int(code)


def run() -> int:
    work = Path(tempfile.mkdtemp(prefix="iotplat-bench-up-"))
    spec_dir = work / "spec"
    shutil.copytree(REPO / "platform" / "examples" / "local", spec_dir)
    data = yaml.safe_load((spec_dir / "platform.yaml").read_text())
    data["name"], data["target"]["network"] = "benchup", "10.217.0.0/24"
    (spec_dir / "platform.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    spec, build = str(spec_dir / "platform.yaml"), str(work / "build")
    os.environ["IOTPLAT_STATE_DIR"] = str(work / "state")
    (work / "key").write_text("bench-vault-password-0123456789abcdef")
    (work / "key").chmod(0o600)
    os.environ["IOTPLAT_VAULT_PASSWORD_FILE"] = str(work / "key")
    try:
        t_render, _ = timed("render", spec, "--out", build, "--json")
        t_first, code = timed("up", spec, "--out", build, "--json")
        if code != 0:
            print(f"first up failed (exit {code})")
            return 1
        inv = [build + "/ansible/inventory.yml"]
        # the fixed cost of reaching the hosts: an ansible ping through the same addresses
        from iotplat.deploy.ansible import addresses_inventory
        from iotplat.deploy.targets import local_settings
        from iotplat.hosts import local_provider
        from iotplat.spec.load import load_platform

        hosts = local_provider(local_settings(load_platform(Path(spec)))).up(["edge", "tsdb", "dash"])
        (work / "addr.yml").write_text(yaml.safe_dump(addresses_inventory(hosts)))
        t = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("ansible")), "all", "-i", inv[0], "-i", str(work / "addr.yml"),
                        "-m", "ansible.builtin.ping"], capture_output=True, check=True, timeout=300)
        t_ping = time.perf_counter() - t
        t_again, code2 = timed("up", spec, "--out", build, "--json", "--no-verify")
        t_status, code3 = timed("status", spec, "--out", build, "--json")
    finally:
        main(["destroy", spec, "--out", build, "--yes", "--json"])
        shutil.rmtree(work, ignore_errors=True)
    print(f"render {t_render:.1f}s | ansible ping (baseline) {t_ping:.1f}s | first up (hosts + deploy + verify) "
          f"{t_first:.1f}s | no-change up {t_again:.1f}s ({t_again / t_ping:.1f}x ping) | status {t_status:.1f}s")
    ok = t_again < 30 and code2 == 0 and code3 == 0
    print(f"target no-change re-run < 30 s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
