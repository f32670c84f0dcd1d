"""`iotplat rotate` refuses what it cannot do with one line and the right exit code, before touching anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import PLATFORM_DIR


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    shutil.copy(PLATFORM_DIR / "platform.yaml", tmp_path / "platform.yaml")
    shutil.copy(PLATFORM_DIR / "devices.csv", tmp_path / "devices.csv")
    return tmp_path / "platform.yaml"


def test_rotate_needs_what(cli) -> None:
    r = cli("rotate")
    assert r.code == 2 and "certs|secrets|device" in r.err


def test_finish_needs_ca(cli, spec: Path, tmp_path: Path) -> None:
    r = cli("rotate", "certs", "--finish", str(spec), "--out", str(tmp_path / "build"))
    assert r.code == 2 and "--ca --finish" in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("what", [("certs",), ("certs", "--ca"), ("secrets",), ("device", "sensor-0001")])
def test_refused_before_a_deploy(cli, spec: Path, tmp_path: Path, what: tuple[str, ...], isolated_state: Path) -> None:
    r = cli("rotate", *what, str(spec), "--out", str(tmp_path / "build"), "--json")
    assert r.code == 1 and "has not been deployed" in r.err and "iotplat up" in r.err
    assert len(r.err.strip().splitlines()) == 1
    secrets = next(isolated_state.rglob("secrets.vault"))
    before = secrets.read_bytes()
    assert cli("rotate", *what, str(spec), "--out", str(tmp_path / "build")).code == 1
    assert secrets.read_bytes() == before  # nothing rotated


@pytest.mark.parametrize("what", [("certs",), ("secrets",), ("device", "sensor-1")])
def test_refused_on_the_nats_engine(cli, tmp_path: Path, what: tuple[str, ...], isolated_state: Path) -> None:
    """rotate's reload path is Mosquitto's: on broker.engine nats it says so in one line, exit 2."""
    for f in (PLATFORM_DIR / "examples" / "cluster").iterdir():
        shutil.copy(f, tmp_path / f.name)
    r = cli("rotate", *what, str(tmp_path / "platform.yaml"), "--out", str(tmp_path / "build"))
    assert r.code == 2 and "broker.engine" in r.err and "mosquitto engine only" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
