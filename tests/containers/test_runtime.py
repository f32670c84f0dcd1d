"""The container runtime in the spec and the render: which services run in containers, their images, and the
promise that the rendered service files are the same bytes whatever the runtime.

Offline: real renders of real specs (iotplat render into temp folders), archives written by iotplat's own OCI
writer (tests/containers/test_archive.py). That hosts load and run what is rendered here is the host tests' part.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from iotplat.commands import render
from iotplat.containers import runtime
from iotplat.containers.images import DEFAULT_IMAGES, parse_image_ref
from iotplat.spec.load import load_platform
from tests.containers.test_archive import build
from tests.helpers import PLATFORM_DIR

UNITS = {"/etc/systemd/system/mosquitto.service": "broker", "/etc/systemd/system/influxdb.service": "influxdb"}


def _spec(tmp: Path, extra: dict, name: str = "platform.yaml") -> Path:
    data = yaml.safe_load((PLATFORM_DIR / "platform.yaml").read_text())
    data.update(extra)
    shutil.copy(PLATFORM_DIR / "devices.csv", tmp / "devices.csv")
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _host_files(out: Path) -> dict[str, bytes]:
    """hosts/<host>/<dest> -> bytes."""
    return {p.relative_to(out / "hosts").as_posix(): p.read_bytes() for p in (out / "hosts").rglob("*") if p.is_file()}


def _group_vars(out: Path) -> dict:
    return yaml.safe_load((out / "ansible/group_vars/all.yml").read_text())


def test_runtime_resolution_platform_then_service(tmp_path: Path) -> None:
    from iotplat.spec.model import Runtimes

    p = load_platform(_spec(tmp_path, {}))
    everything = p.spec.model_copy(update={"runtime": Runtimes(default="container")})
    assert {s: runtime.runtime_of(everything, s) for s in ("broker", "worker", "influxdb", "grafana")} == dict.fromkeys(
        ("broker", "worker", "influxdb", "grafana"), "container")
    assert runtime.runtime_of(everything, "toy-plugin") == "package"  # plugins have no container runtime yet
    p = load_platform(_spec(tmp_path, {"runtime": {"default": "container", "worker": "package", "grafana": "package"}}))
    assert runtime.container_services(p) == ["broker", "influxdb"]
    p = load_platform(_spec(tmp_path, {"runtime": {"default": "package", "broker": "container"}}))
    assert [runtime.runtime_of(p.spec, s) for s in ("broker", "worker", "influxdb")] == ["container", "package", "package"]
    assert runtime.container_services(p) == ["broker"]
    p = load_platform(_spec(tmp_path, {}))
    assert runtime.container_services(p) == []  # the default stays package-based


def test_images_default_to_the_pins_and_the_spec_overrides_them(tmp_path: Path) -> None:
    p = load_platform(_spec(tmp_path, {"runtime": {"broker": "container"}}))
    assert str(runtime.image_ref(p.spec, "broker")) == DEFAULT_IMAGES["broker"].written
    assert str(runtime.image_ref(p.spec, "influxdb")) == DEFAULT_IMAGES["influxdb1"].written
    pin = "registry.example:5000/team/mosquitto:2.0.22-1@sha256:" + "ab" * 32
    p = load_platform(_spec(tmp_path, {"runtime": {"broker": "container"}, "images": {"broker": pin}}))
    assert str(runtime.image_ref(p.spec, "broker")) == pin


def test_both_runtimes_render_the_same_service_files_byte_for_byte(tmp_path: Path) -> None:
    """The 'identical' promise across runtimes: every file the package runtime renders is rendered, with the same
    bytes, for the container runtime; the container runtime adds exactly the units that run the images."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "ctr").mkdir()
    state = tmp_path / "state"  # one state: the same CA, keys and passwords for both renders
    render(str(_spec(tmp_path / "pkg", {})), None, out_dir=str(tmp_path / "out-pkg"), state_dir=str(state))
    render(str(_spec(tmp_path / "ctr", {"runtime": {"default": "container", "worker": "package", "grafana": "package"}})),
           None, out_dir=str(tmp_path / "out-ctr"), state_dir=str(state))
    pkg, ctr = _host_files(tmp_path / "out-pkg"), _host_files(tmp_path / "out-ctr")
    assert len(pkg) > 10
    for name, data in pkg.items():
        assert ctr.get(name) == data, f"{name} differs between the runtimes"
    added = {"/" + name.split("/", 1)[1] for name in set(ctr) - set(pkg)}
    assert added == set(UNITS)
    for name, data in ctr.items():
        if "/" + name.split("/", 1)[1] in UNITS:
            unit = data.decode()
            assert "ExecStart=/usr/bin/docker wait" in unit and "--privileged" not in unit
            assert "--log-driver journald" in unit and "--cap-drop ALL" in unit and "--pull never" in unit
    mosquitto = next(d for n, d in ctr.items() if n.endswith("mosquitto.service")).decode()
    assert DEFAULT_IMAGES["broker"].digest in mosquitto  # no archive: the host pulls by digest, runs NAME@DIGEST
    assert f"eclipse-mosquitto@{DEFAULT_IMAGES['broker'].digest}" in mosquitto
    # the role's inputs: only the container services get any, and the package bundle names no runtime at all
    gv_pkg, gv_ctr = _group_vars(tmp_path / "out-pkg"), _group_vars(tmp_path / "out-ctr")
    assert not [k for k in gv_pkg if k.endswith(("_runtime", "_container"))]
    assert gv_ctr["mosquitto_runtime"] == gv_ctr["influxdb_runtime"] == "container"
    assert "worker_runtime" not in gv_ctr and "grafana_runtime" not in gv_ctr
    assert gv_ctr["mosquitto_container"]["image"]["run"] == f"eclipse-mosquitto@{DEFAULT_IMAGES['broker'].digest}"
    assert gv_ctr["mosquitto_container"]["unit_path"] == "/etc/systemd/system/mosquitto.service"
    assert {o["path"]: o["uid"] for o in gv_ctr["influxdb_container"]["owned"]}["/var/lib/influxdb"] == 1500
    manifest = json.loads((tmp_path / "out-ctr/manifest.json").read_text())
    classes = {f["dest"]: f["class"] for f in manifest["files"] if f["dest"] in UNITS}
    assert set(classes) == set(UNITS) and set(classes.values()) == {"identical"}


def test_an_archive_is_verified_at_render_and_referenced_not_copied(tmp_path: Path, monkeypatch) -> None:
    """With images.archive the unit runs the verified image ID; the build directory names the load archive (in the
    controller's image cache) and its sha256, and never holds image bytes."""
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    archive, digest, _ = build(tmp_path, name="docker.io/library/eclipse-mosquitto", familiar="eclipse-mosquitto",
                               tag="2.0.22-standin")
    spec = _spec(tmp_path, {"runtime": {"broker": "container"},
                            "images": {"broker": f"eclipse-mosquitto:2.0.22-standin@{digest}",
                                       "archive": {"broker": archive.name}}})
    render(str(spec), None, out_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"))
    image = _group_vars(tmp_path / "out")["mosquitto_container"]["image"]
    assert image["run"] == image["image_id"] and image["image_id"].startswith("sha256:")
    cached = tmp_path / "cache" / image["archive"]
    assert cached.is_file()
    import hashlib

    assert hashlib.sha256(cached.read_bytes()).hexdigest() == image["archive_sha256"]
    unit = next((tmp_path / "out/hosts").rglob("mosquitto.service")).read_text()
    assert f" {image['image_id']} " in unit
    size = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert not list((tmp_path / "out").rglob("*.tar")) and size < 2_000_000


def test_a_wrong_archive_is_refused_at_render_with_one_line(tmp_path: Path, cli, monkeypatch) -> None:
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    archive, _, _ = build(tmp_path, name="docker.io/library/eclipse-mosquitto", familiar="eclipse-mosquitto")
    other = "sha256:" + "0" * 64
    spec = _spec(tmp_path, {"runtime": {"broker": "container"},
                            "images": {"broker": f"eclipse-mosquitto:1.0@{other}", "archive": {"broker": archive.name}}})
    result = cli("render", str(spec), "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state"))
    assert result.code == 2 and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1 and archive.name in result.err and other in result.err
    assert not (tmp_path / "out").exists()


def test_reference_helpers_are_closed_values() -> None:
    ref = parse_image_ref(DEFAULT_IMAGES["broker"].written)
    img = runtime.ContainerImage("broker", ref)
    assert img.run == ref.pinned and set(img.as_vars()) == {"ref", "tagged", "pinned", "run"}


@pytest.mark.parametrize(("extra", "says"), [({"runtime": {"worker": "container"}}, "must be given as an archive"),
                                              ({"runtime": {"grafana": "container"}}, "not supported yet")])
def test_what_cannot_run_is_refused_not_half_deployed(tmp_path: Path, cli, extra: dict, says: str) -> None:
    spec = _spec(tmp_path, extra)
    result = cli("render", str(spec), "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state"))
    assert result.code == 2 and says in result.err and not (tmp_path / "out").exists()


def test_the_worker_image_is_built_from_the_wheelhouse_at_render(tmp_path: Path, monkeypatch) -> None:
    """runtime worker: container: iotplat builds the worker image on the verified base archive from the wheelhouse
    the package runtime installs, and the replicas' template unit runs it by its ID; the credentials become readable
    by the image's group (they are mounted read-only), nothing else of the worker's files changes."""
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    base, digest, _ = build(tmp_path, name="docker.io/library/python", familiar="python", tag="3.13-test")
    (tmp_path / "ctr").mkdir()
    (tmp_path / "pkg").mkdir()
    state = tmp_path / "state"
    render(str(_spec(tmp_path / "pkg", {})), None, out_dir=str(tmp_path / "out-pkg"), state_dir=str(state))
    spec = _spec(tmp_path / "ctr", {"runtime": {"worker": "container"},
                                    "images": {"worker_base": f"python:3.13-test@{digest}",
                                               "archive": {"worker_base": str(base)}}})
    render(str(spec), None, out_dir=str(tmp_path / "out-ctr"), state_dir=str(state))
    pkg, ctr = _host_files(tmp_path / "out-pkg"), _host_files(tmp_path / "out-ctr")
    assert {n: d for n, d in ctr.items() if n in pkg} == pkg
    (unit_name,) = [n for n in set(ctr) - set(pkg)]
    assert unit_name.endswith("/etc/systemd/system/iotplat-worker@.service")
    gv = _group_vars(tmp_path / "out-ctr")
    image = gv["worker_container"]["image"]
    assert image["tagged"].startswith("localhost/iotplat-worker:") and image["image_id"].startswith("sha256:")
    unit = ctr[unit_name].decode()
    assert f" {image['image_id']} " in unit and "--user 10001:10001" in unit and "iotplat-worker-%i" in unit
    assert (tmp_path / "cache" / image["archive"]).is_file()
    secrets = yaml.safe_load((tmp_path / "out-ctr/ansible/inventory.yml").read_text())
    files = [f for h in secrets["all"]["hosts"].values() for f in h["iotplat_secret_files"] if f["service"] == "worker"]
    assert files and {(f["group"], f["mode"]) for f in files} == {("iotplat-worker", "0640")}
