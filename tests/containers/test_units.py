"""Container units, daemon.json and the engine preflight, offline. On real hosts: test_containers_hosts.py (where
systemd parses these units and the hostile words below arrive in the container verbatim)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from iotplat.containers.engine import daemon_json, engine_problem
from iotplat.containers.profiles import broker_service, influxdb1_service, worker_service
from iotplat.containers.units import ContainerService, Limits, Mount, UnitValueError, container_unit
from iotplat.hosts.machine import remove_container_cgroups

IMAGE = "sha256:" + "a" * 64


def exec_lines(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("Exec"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_broker_unit_has_the_hardening_the_runtime_promises():
    text = container_unit(broker_service(IMAGE, (8883,)).unit)
    create = next(v for v in exec_lines(text)["ExecStartPre"] if " create " in v)
    words = shlex.split(create)  # plain words only here, so POSIX splitting equals systemd's
    for flag in ("--init", "--read-only", "--pull", "never", "--network", "host", "--log-driver", "journald"):
        assert flag in words
    # removed by the unit when stopped, not by dockerd later (--rm): a restart's create found the name taken
    assert "--rm" not in words
    assert exec_lines(text)["ExecStopPost"] == ["-/usr/bin/docker rm --force mosquitto"]
    free = exec_lines(text)["ExecStartPre"][0]
    assert free.startswith("/bin/sh -c '/usr/bin/docker rm --force \"$$1\"") and free.endswith("' sh mosquitto")
    assert words[words.index("--cap-drop") + 1] == "ALL"
    assert [words[i + 1] for i, w in enumerate(words) if w == "--cap-add"] == ["KILL", "SETGID", "SETUID"]
    assert "no-new-privileges" in words and "--privileged" not in words
    assert "-p" not in words and "--publish" not in words, "no port is published: host network + host firewall"
    assert "OBJECT_SYSTEMD_UNIT=mosquitto.service" in words
    # no --ulimit: raising a hard limit needs CAP_SYS_RESOURCE, which this machine's test hosts lack (their hard
    # limit is 20,000), so a fixed figure could keep the container from starting; it keeps dockerd's default
    assert "--ulimit" not in words
    mounts = [words[i + 1] for i, w in enumerate(words) if w == "--mount"]
    assert "type=bind,source=/etc/mosquitto,target=/etc/mosquitto,readonly" in mounts
    assert "type=bind,source=/var/lib/mosquitto,target=/var/lib/mosquitto" in mounts
    assert not any(w.startswith(("--env", "-e")) for w in words), "the broker gets no environment at all"
    assert exec_lines(text)["ExecStart"] == ["/usr/bin/docker wait mosquitto"]
    assert exec_lines(text)["ExecReload"] == ["/usr/bin/docker kill --signal HUP mosquitto"]
    assert words[words.index(IMAGE) + 1:] == ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"]


def test_units_are_deterministic_and_templates_use_the_instance():
    a = container_unit(worker_service(IMAGE, 9464).unit)
    assert a == container_unit(worker_service(IMAGE, 9464).unit)
    create = next(v for v in exec_lines(a)["ExecStartPre"] if " create " in v)
    assert '--name "iotplat-worker-%i"' in create  # quoted: {instance} is not a plain word before it becomes %i
    assert '"OBJECT_SYSTEMD_UNIT=iotplat-worker@%i.service"' in create
    assert '"type=bind,source=/etc/iotplat/credentials/worker-%i,target=/run/credentials/iotplat-worker,readonly"' \
        in create
    assert '"IOTPLAT_WORKER_REPLICA=%i"' in create and "--user 10001:10001" in create
    influx = container_unit(influxdb1_service(IMAGE, 8086).unit)
    assert "--user 1500:1500" in influx and "target=/run/credentials/influxdb.service,readonly" in influx


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("$HOME", '"$$HOME"'),
        ("%n", '"%%n"'),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        (";", '";"'),
        ("plain-word_1.2:/x=y@z,+", "plain-word_1.2:/x=y@z,+"),
    ],
)
def test_command_words_are_escaped_for_systemd(word, written):
    svc = ContainerService(unit="t.service", name="t", description="t", image=IMAGE, command=(word,))
    create = next(v for v in exec_lines(container_unit(svc))["ExecStartPre"] if " create " in v)
    assert create.endswith(f"{IMAGE} {written}")


@pytest.mark.parametrize(
    "change",
    [
        {"unit": "x.service\nExecStart=/bin/sh"},
        {"unit": "../x.service"},
        {"name": "a b"},
        {"name": "x{instance}"},  # only templates may use the instance
        {"image": "eclipse-mosquitto:2.0.22"},  # a tag is never run
        {"image": f"{IMAGE} --privileged"},
        {"user": "root"},
        {"capabilities": ("SYS_ADMIN",)},
        {"capabilities": ("ALL",)},
        {"mounts": (Mount("/etc/x,readonly=false", "/etc/x"),)},
        {"mounts": (Mount("/etc/../root", "/x"),)},
        {"mounts": (Mount("relative", "/x"),)},
        {"tmpfs": ("/tmp:exec",)},
        {"env": (("MQTT_PASSWORD", "x"),)},  # secrets are files
        {"env": (("A", "line\nExecStart=/bin/sh"),)},
        {"env": (("A B", "x"),)},
        {"command": ("ok\nExecStartPost=/bin/sh",)},
        {"command": ("\x00",)},
        {"description": "x\\"},
        {"description": "x\nExecStart=/bin/sh"},
        {"reload_signal": "KILL; rm"},
        {"limits": Limits(pids=0)},
        {"limits": Limits(memory_bytes=1)},
    ],
)
def test_hostile_values_are_refused(change):
    base = dict(unit="t.service", name="t", description="t", image=IMAGE)
    with pytest.raises(UnitValueError):
        container_unit(ContainerService(**{**base, **change}))


def test_description_percent_is_doubled():
    svc = ContainerService(unit="t.service", name="t", description="100% $HOME", image=IMAGE)
    assert "Description=100%% $HOME" in container_unit(svc)


def test_daemon_json_keeps_dockerd_off_the_firewall():
    cfg = json.loads(daemon_json())
    assert cfg["iptables"] is False and cfg["ip-forward"] is False and cfg["bridge"] == "none"
    assert cfg["log-driver"] == "journald" and cfg["features"]["containerd-snapshotter"] is False
    assert daemon_json() == daemon_json()


def test_engine_preflight():
    ok = {"OSType": "linux", "ServerVersion": "20.10.24+dfsg1", "Driver": "overlay2", "LoggingDriver": "journald",
          "DriverStatus": [["Backing Filesystem", "extfs"]]}
    assert engine_problem(json.dumps(ok)) is None
    c8d = {**ok, "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]]}
    assert "containerd image store" in engine_problem(json.dumps(c8d))
    assert "too old" in engine_problem(json.dumps({**ok, "ServerVersion": "19.03.1"}))
    assert "log driver" in engine_problem(json.dumps({**ok, "LoggingDriver": "json-file"}))
    assert "dockerd running" in engine_problem("Cannot connect to the Docker daemon")


def test_remove_container_cgroups_removes_only_empty_ones(tmp_path: Path):
    """A stand-in for cgroupfs: rmdir of a cgroup with processes fails (EBUSY) like rmdir of a non-empty dir."""
    root = tmp_path / "cgroup"
    (root / "memory" / "docker" / "gone1").mkdir(parents=True)
    (root / "pids" / "docker" / "gone2").mkdir(parents=True)
    busy = root / "cpu" / "docker" / "busy"
    busy.mkdir(parents=True)
    (busy / "cgroup.procs").write_text("1234\n")
    (root / "memory" / "other").mkdir()
    left = remove_container_cgroups(root)
    assert not (root / "memory" / "docker").exists() and not (root / "pids" / "docker").exists()
    assert busy.exists() and (root / "memory" / "other").exists()
    assert str(busy) in left

