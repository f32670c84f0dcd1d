"""Resource limits from the spec (`resources`), offline: the container unit's flags and the package unit's drop-in
carry the same numbers, and a platform that names no limits renders as before.

What this proves: the rendered bytes (units, drop-ins, the build directory) and that both runtimes say the same
limits. What it cannot: that the kernel enforces them; systemd and docker on the test hosts parse these files in
the containers e2e (docker inspect) and the deploy tests."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from iotplat.commands import render
from iotplat.containers import runtime
from iotplat.containers.profiles import broker_service, influxdb1_service, worker_service
from iotplat.containers.units import DEFAULT_LIMITS, Limits, UnitValueError, container_unit, limits_dropin
from iotplat.spec.load import load_platform
from tests.helpers import PLATFORM_DIR

IMAGE = "sha256:" + "a" * 64
DROPIN = "iotplat-resources-{}.conf"


def _spec(tmp: Path, extra: dict) -> Path:
    data = yaml.safe_load((PLATFORM_DIR / "platform.yaml").read_text())
    data.update(extra)
    shutil.copy(PLATFORM_DIR / "devices.csv", tmp / "devices.csv")
    path = tmp / "platform.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _host_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out / "hosts").as_posix(): p.read_bytes() for p in (out / "hosts").rglob("*") if p.is_file()}


def _flags(unit: str) -> dict[str, str]:
    """The limit flags of a container unit's `docker create` line."""
    create = next(line for line in unit.splitlines() if line.startswith("ExecStartPre=") and " create " in line)
    words = shlex.split(create.partition("=")[2])
    flags = ("--memory", "--memory-swap", "--cpus", "--pids-limit")
    return {w: words[i + 1] for i, w in enumerate(words) if w in flags}


def _dropin(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "[Service]"
    return dict(line.split("=", 1) for line in lines[1:])


def _same_limits(flags: dict[str, str], settings: dict[str, str]) -> None:
    """docker's flags and systemd's settings name the same cgroup v2 limits."""
    assert settings["MemoryMax"] == flags["--memory"] == flags["--memory-swap"]  # swap = memory: none
    assert settings["MemorySwapMax"] == "0"
    assert settings["TasksMax"] == flags["--pids-limit"]
    if "--cpus" in flags:
        assert settings["CPUQuota"] == f"{round(float(flags['--cpus']) * 100)}%"
    else:
        assert "CPUQuota" not in settings


@pytest.mark.parametrize("limits", [Limits(memory_bytes=768 << 20, cpus=1.5, pids=300),
                                    Limits(memory_bytes=64 << 20, cpus=0.01, pids=16),
                                    Limits(memory_bytes=1 << 30)])
def test_the_dropin_and_the_container_flags_say_the_same(limits: Limits) -> None:
    unit = container_unit(broker_service(IMAGE, (8883,), limits).unit)
    text = limits_dropin("mosquitto.service", limits, "broker")
    assert text.startswith("# Managed by iotplat") and text.endswith("\n")
    settings = _dropin(text)
    assert settings["MemoryMax"] == str(limits.memory_bytes)
    _same_limits(_flags(unit), settings)


def test_the_defaults_are_todays_profile_values() -> None:
    assert _flags(container_unit(broker_service(IMAGE, (8883,)).unit))["--memory"] == str(512 << 20)
    assert _flags(container_unit(influxdb1_service(IMAGE, 8086).unit))["--memory"] == str(1 << 30)
    assert _flags(container_unit(worker_service(IMAGE, 9464).unit)) == {
        "--pids-limit": "512", "--memory": str(256 << 20), "--memory-swap": str(256 << 20)}


@pytest.mark.parametrize(("unit", "limits", "service"), [
    ("mosquitto.service\nExecStart=/bin/sh", Limits(memory_bytes=64 << 20), "broker"),
    ("mosquitto.service", Limits(memory_bytes=1 << 20), "broker"),
    ("mosquitto.service", Limits(pids=0), "broker"),
    ("mosquitto.service", Limits(cpus=0.001), "broker"),
    ("toy.service", Limits(), "toy-plugin"),
])
def test_the_dropin_refuses_what_is_not_a_closed_value(unit: str, limits: Limits, service: str) -> None:
    with pytest.raises(UnitValueError):
        limits_dropin(unit, limits, service)


def test_limits_of_fills_what_the_spec_leaves_out(tmp_path: Path) -> None:
    p = load_platform(_spec(tmp_path, {"resources": {"influxdb": {"cpus": 2}, "worker": {"memory": "300MiB"}}}))
    assert runtime.limits_of(p, "influxdb") == Limits(memory_bytes=1 << 30, cpus=2.0, pids=512)
    assert runtime.limits_of(p, "worker") == Limits(memory_bytes=300 << 20, pids=512)
    assert runtime.limits_of(p, "broker") == DEFAULT_LIMITS["broker"]
    limited = [s for s in ("broker", "worker", "influxdb", "grafana") if runtime.limited(p.spec, s)]
    assert limited == ["worker", "influxdb"]


def test_the_brokers_default_memory_grows_with_its_worker_queues(tmp_path: Path) -> None:
    """512MiB unless the worker sessions' queues (replicas x queue_bytes + 32MiB) need more: a container's default
    never sits below the floor validate holds a written limit to."""
    p = load_platform(_spec(tmp_path, {"runtime": {"broker": "container"}}))
    floor = runtime.memory_floor(p, "broker")[0]
    assert floor < 512 << 20 and runtime.limits_of(p, "broker").memory_bytes == 512 << 20
    ingestion = yaml.safe_load((PLATFORM_DIR / "platform.yaml").read_text())["ingestion"]
    p = load_platform(_spec(tmp_path, {"runtime": {"broker": "container"}, "ingestion": {**ingestion, "peak_rate": 5000}}))
    floor = runtime.memory_floor(p, "broker")[0]
    assert floor == 32 * 2**20 + -(-p.spec.ingestion.replicas * p.queue_bytes // 2**20) * 2**20 > 512 << 20
    assert runtime.limits_of(p, "broker").memory_bytes == floor
    assert f"--memory {floor} --memory-swap {floor}" in container_unit(runtime.service_container(p, "broker").unit)
    p = load_platform(_spec(tmp_path, {"runtime": {"broker": "container"}, "ingestion": {**ingestion, "peak_rate": 5000},
                                       "resources": {"broker": {"pids": 100}}}))
    assert runtime.limits_of(p, "broker") == Limits(memory_bytes=floor, pids=100)


def test_both_runtimes_apply_the_same_limits_and_nothing_else_differs(tmp_path: Path) -> None:
    """Package: a drop-in per service named under `resources`; container: the same numbers as the unit's flags.
    Every other file is the same bytes on both runtimes."""
    resources = {"broker": {"memory": "768MiB", "cpus": 1.5, "pids": 300}, "influxdb": {"memory": "2GiB"},
                 "worker": {"memory": "300MiB", "cpus": 0.5}}
    (tmp_path / "pkg").mkdir()
    (tmp_path / "ctr").mkdir()
    state = tmp_path / "state"
    render(str(_spec(tmp_path / "pkg", {"resources": resources})), None, out_dir=str(tmp_path / "out-pkg"),
           state_dir=str(state))
    render(str(_spec(tmp_path / "ctr", {"resources": resources, "runtime": {
        "default": "container", "worker": "package", "grafana": "package"}})),
        None, out_dir=str(tmp_path / "out-ctr"), state_dir=str(state))
    pkg, ctr = _host_files(tmp_path / "out-pkg"), _host_files(tmp_path / "out-ctr")
    dropins = {n.split("/", 1)[1]: d.decode() for n, d in pkg.items() if "/iotplat-resources-" in n}
    assert set(dropins) == {f"etc/systemd/system/{u}.d/{DROPIN.format(s)}" for u, s in (
        ("mosquitto.service", "broker"), ("influxdb.service", "influxdb"), ("iotplat-worker@.service", "worker"))}
    units = {n.rsplit("/", 1)[1]: d.decode() for n, d in ctr.items() if n.endswith((
        "system/mosquitto.service", "system/influxdb.service"))}
    for unit, text in units.items():
        service = "broker" if unit == "mosquitto.service" else "influxdb"
        _same_limits(_flags(text), _dropin(dropins[f"etc/systemd/system/{unit}.d/{DROPIN.format(service)}"]))
    assert _flags(units["mosquitto.service"])["--cpus"] == "1.5"
    assert _dropin(dropins[f"etc/systemd/system/iotplat-worker@.service.d/{DROPIN.format('worker')}"]) == {
        "MemoryMax": str(300 << 20), "MemorySwapMax": "0", "CPUQuota": "50%", "TasksMax": "512"}
    # the worker stays a package on both: the same drop-in; the container services get none (their unit has them)
    for name, data in pkg.items():
        if name.endswith(("mosquitto.service.d/" + DROPIN.format("broker"),
                          "influxdb.service.d/" + DROPIN.format("influxdb"))):
            assert name not in ctr
        else:
            assert ctr.get(name) == data, f"{name} differs between the runtimes"


def test_a_package_platform_without_resources_gets_no_dropin(tmp_path: Path) -> None:
    render(str(_spec(tmp_path, {})), None, out_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"))
    assert not [n for n in _host_files(tmp_path / "out") if "iotplat-resources" in n]


def test_nats_gets_its_dropin_on_its_own_unit(tmp_path: Path) -> None:
    p = load_platform(_spec(tmp_path, {"broker": {"engine": "nats"}, "resources": {"broker": {"memory": "1GiB"}}}))
    (f,) = runtime.limits_files(p, "broker")
    assert f.dest == f"/etc/systemd/system/nats-server.service.d/{DROPIN.format('broker')}"
    assert _dropin(f.content.decode())["MemoryMax"] == str(1 << 30)


@pytest.mark.parametrize(("max_connections", "expected"), [(-1, 65536), (1000, 65536), (100_000, 101_024),
                                                           (5_000_000, 1 << 20)])
def test_the_brokers_open_files_follow_max_connections(tmp_path: Path, max_connections: int, expected: int) -> None:
    """One descriptor per device connection, at least 65,536 (Debian's unit leaves 1,024: ~1,017 devices), at most
    the kernel's nr_open: the package unit's LimitNOFILE (roles/mosquitto's drop-in)."""
    from iotplat.services.broker import Broker, open_files

    data = yaml.safe_load((PLATFORM_DIR / "platform.yaml").read_text())
    broker = data.setdefault("broker", {})
    broker.setdefault("limits", {})["max_connections"] = max_connections
    p = load_platform(_spec(tmp_path, {"broker": broker}))
    assert open_files(p) == expected
    assert Broker().group_vars(p)["mosquitto_open_files"] == expected
