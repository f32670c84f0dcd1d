"""The roles' side of `resources` on the package runtime: roles/common/tasks/files.yml, run by real ansible-playbook
on this machine, inside a private mount namespace whose /etc/systemd/system is an empty tmpfs (nothing of the
machine's own units is read or changed; the namespace and its mount end with the process).

What it proves: the rendered drop-ins of the `resources` golden case are installed into drop-in folders the task
makes, byte for byte, without the service's config validator (which still checks the other files) and without a
backup copy in the drop-in folder; a drop-in of the same service that the spec no longer names is removed and
another service's is left alone; systemd is told to reload exactly when a unit file changed; a second run changes
nothing; a check-mode run on a fresh host changes nothing and reports the change.
What it cannot: PID 1 here is not systemd, so `systemctl` is a recorder placed first on PATH (the systemd_service
module runs `systemctl daemon-reload`); that systemd applies the limits is for the deploy tests on nspawn hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # three ansible-playbook runs: ~20-50 s on 2 cores

BUILD = REPO / "tests/render/golden/resources/expected"  # a real build directory (render's output, checked)
VENV_BIN = Path(sys.executable).parent
UNITS = "/etc/systemd/system"
OWN = f"{UNITS}/iotplat-worker@.service.d/iotplat-resources-worker.conf"
STALE = f"{UNITS}/old.service.d/iotplat-resources-worker.conf"
OTHER = f"{UNITS}/mosquitto.service.d/iotplat-resources-broker.conf"

PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - ansible.builtin.include_role: {name: common, tasks_from: files}
      vars:
        common_files_service: worker
        common_files_backup: true
        common_files_validate: "/bin/sh -c '! grep -q MemoryMax \\"$0\\"' %s"
    - ansible.builtin.debug: {msg: "CHANGED={{ common_files_changed }}"}
"""

SCRIPT = r"""
set -eu
mount -t tmpfs tmpfs /etc/systemd/system
mkdir -p "$(dirname "$STALE")" "$(dirname "$OTHER")"
echo stale > "$STALE"
echo other > "$OTHER"
run() { "$VENV_BIN/ansible-playbook" -i localhost, -e "ansible_python_interpreter=$PY" -e "@$VARS" "$@" "$PLAY" \
          > "$OUT/run$N.log" 2>&1 || { echo "run $N failed" >> "$OUT/run$N.log"; }; N=$((N + 1)); }
N=1
run --check
find /etc/systemd/system -type f | sort > "$OUT/after1.txt"
run
find /etc/systemd/system -type f | sort > "$OUT/after2.txt"
cp "$OWN" "$OUT/installed.conf" || true
run
find /etc/systemd/system | sort > "$OUT/after3.txt"
"""


def _runnable() -> str:
    if os.geteuid() != 0:
        return "needs root (a private mount namespace)"
    if not shutil.which("unshare") or not (VENV_BIN / "ansible-playbook").exists():
        return "needs unshare and ansible-playbook"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -m is not allowed here: {probe.stderr.decode().strip()}"
    return ""


@pytest.mark.skipif(bool(_runnable()), reason=_runnable() or "runnable")
def test_files_yml_installs_reloads_and_removes_limit_dropins(tmp_path: Path) -> None:
    inventory = yaml.safe_load((BUILD / "ansible/inventory.yml").read_text())
    files = [f for f in inventory["all"]["hosts"]["edge"]["iotplat_files"] if f["service"] == "worker"]
    assert OWN in {f["dest"] for f in files}, "the golden case renders the worker's drop-in"
    # the worker's other files go to a scratch folder instead of /etc (they are validated; the drop-in must not be)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for f in files:
        if not f["dest"].startswith(UNITS):
            f["dest"] = str(scratch / Path(f["dest"]).name)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "vars.yml").write_text(yaml.safe_dump({"iotplat_build_dir": str(BUILD), "iotplat_files": files}))
    (tmp_path / "play.yml").write_text(PLAY)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {out}/systemctl.log\n')
    (fakebin / "systemctl").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(PATH=f"{fakebin}:{VENV_BIN}:{env.get('PATH', '')}", ANSIBLE_ROLES_PATH=str(REPO / "roles"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"), HOME=str(tmp_path),
               VENV_BIN=str(VENV_BIN), PY=sys.executable, VARS=str(tmp_path / "vars.yml"),
               PLAY=str(tmp_path / "play.yml"), OUT=str(out), STALE=STALE, OTHER=OTHER, OWN=OWN)
    subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", SCRIPT], env=env, check=True,
                   timeout=300)
    logs = [(out / f"run{n}.log").read_text() for n in (1, 2, 3)]
    for log in logs:
        assert "failed" not in log.splitlines()[-1] and "failed=0" in log, log
    reloads = (out / "systemctl.log").read_text().splitlines() if (out / "systemctl.log").exists() else []
    # 1: check mode on a host without the folder: nothing written or removed, the change reported
    assert (out / "after1.txt").read_text().split() == sorted([STALE, OTHER])
    assert "CHANGED=True" in logs[0]
    # 2: installed as rendered, never validated (the validator refuses any MemoryMax) nor backed up; the worker's
    # stale drop-in removed, the broker's kept; systemd reloaded once
    assert (out / "after2.txt").read_text().split() == sorted([OWN, OTHER])
    assert (out / "installed.conf").is_file(), logs[1]
    assert (out / "installed.conf").read_bytes() == (BUILD / f"hosts/edge{OWN}").read_bytes()
    assert "CHANGED=True" in logs[1]
    assert {p.name for p in scratch.iterdir()} == {Path(f["dest"]).name for f in files if f["dest"].startswith(
        str(scratch))}, "the worker's other files were installed (their validator passed)"
    # 3: nothing to do, no reload
    assert "CHANGED=False" in logs[2]
    assert not [line for line in (out / "after3.txt").read_text().split() if line.endswith("~")]
    assert reloads == ["daemon-reload"]
