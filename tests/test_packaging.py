"""The built wheel carries roles/, templates/, platform/ and stacks/, and works outside a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("iotplat-*.whl")
    return whl


def test_wheel_contains_the_data_folders(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("iotplat/_data/platform/platform.schema.json", "iotplat/_data/platform/platform.yaml",
                     "iotplat/_data/templates/mosquitto/mosquitto.conf.j2", "iotplat/_data/roles/mosquitto/tasks/main.yml",
                     "iotplat/_data/stacks/aws/__main__.py", "iotplat/cli.py", "iotplat/worker/core.py"):
        assert required in names, required
    assert not any(n.startswith("platform/") or "/__pycache__/" in n for n in names)
    assert not any(n.startswith("iotplat/_data/platform/") and n.endswith(".py") for n in names)


def test_installed_wheel_works_outside_a_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "IOTPLAT_STATE_DIR": str(tmp_path / "state")}
    where = subprocess.run([sys.executable, "-c", "import iotplat.resources as r; print(r.data_dir('roles'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == site / "iotplat" / "_data" / "roles"
    r = subprocess.run([sys.executable, "-m", "iotplat.cli", "validate"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(site) in r.stdout  # the default spec shipped inside the wheel
    r = subprocess.run([sys.executable, "-m", "iotplat.cli", "render", "--out", str(tmp_path / "b")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "ansible" / "site.yml").exists()
