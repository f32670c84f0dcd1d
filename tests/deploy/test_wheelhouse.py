"""The worker wheel is reproducible and carries only the worker (no CLI dependencies)."""

from __future__ import annotations

import subprocess
import venv
import zipfile
from pathlib import Path

from iotplat.deploy.wheelhouse import build_worker_wheel


def test_reproducible_and_minimal(tmp_path: Path) -> None:
    a = build_worker_wheel(tmp_path / "a")
    b = build_worker_wheel(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    names = zipfile.ZipFile(a).namelist()
    assert "iotplat/worker/core.py" in names and "iotplat/__init__.py" in names
    assert not any(n.startswith(("iotplat/spec", "iotplat/render", "iotplat/deploy", "iotplat/secrets")) for n in names)
    meta = zipfile.ZipFile(a).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: paho-mqtt==" in meta and "pydantic" not in meta
    eps = zipfile.ZipFile(a).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "json = iotplat.worker.decoders:JsonDecoder" in eps


def test_installs_and_runs_without_cli_dependencies(tmp_path: Path) -> None:
    """In a bare venv with --no-deps: the worker imports and checks a config; pydantic is absent."""
    wheel = build_worker_wheel(tmp_path / "w")
    venv.create(tmp_path / "venv", with_pip=True)
    py = tmp_path / "venv" / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=120)
    probe = "import importlib.util as u, iotplat.worker.config as c; print(u.find_spec('pydantic') is None)"
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_wheelhouse_folder_is_per_content(tmp_path: Path) -> None:
    """Two checkouts (or releases) on one controller share the cache root but never each other's worker: the
    folder is named after the digest of its SHA256SUMS; dependency wheels are downloaded once into deps/."""
    import hashlib

    from iotplat.deploy.wheelhouse import build_wheelhouse

    other = tmp_path / "0123456789abcdef"  # what another checkout left in the same root
    other.mkdir()
    (other / "iotplat-0.0.1-py3-none-any.whl").write_bytes(b"someone else's worker")
    first = build_wheelhouse(tmp_path)
    again = build_wheelhouse(tmp_path)
    assert first == again and first != other
    sums = (first / "SHA256SUMS").read_text()
    assert first.name == hashlib.sha256(sums.encode()).hexdigest()[:16]
    names = sorted(p.name for p in first.iterdir())
    assert names[0] == "SHA256SUMS" and "requirements-worker.txt" in names
    assert [n for n in names if n.startswith("iotplat-")] == [build_worker_wheel(tmp_path / "w").name]
    assert (other / "iotplat-0.0.1-py3-none-any.whl").read_bytes() == b"someone else's worker"
    assert any((tmp_path / "deps").glob("paho_mqtt-*.whl"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]  # no staging left behind
