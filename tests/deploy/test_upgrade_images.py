"""A container service's pinned image is one of its versions: a new digest is an upgrade `up` rolls out host by
host with the canary after each (iotplat/deploy/upgrade.py), and a failed one says which digest to set back.

Real renders of platform/examples/containers (the broker and InfluxDB in containers, no archive: the hosts would
pull by digest), no hosts; that `up` really takes the rolling path on hosts is tests/containers/test_runtime_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from iotplat.commands import render
from iotplat.containers import runtime
from iotplat.deploy import upgrade
from iotplat.services.worker import Worker
from iotplat.spec.load import load_platform
from tests.helpers import EXAMPLES

SOURCE = EXAMPLES / "containers" / "platform.yaml"  # edge: broker (container) + worker (package); tsdb: influxdb
NEW = "eclipse-mosquitto:2.0.22@sha256:" + "1" * 64


def _spec(tmp: Path, edit=None) -> Path:
    data = yaml.safe_load(SOURCE.read_text())
    if edit:
        edit(data)
    path = tmp / "platform.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _versions(spec: Path, out: Path) -> dict[str, str]:
    render(str(spec), None, out_dir=str(out), state_dir=str(out.parent / "state"))
    return upgrade.versions(out, None)


def test_a_container_service_versions_its_pinned_image(tmp_path: Path) -> None:
    written = yaml.safe_load(SOURCE.read_text())["images"]
    v = _versions(_spec(tmp_path), tmp_path / "b")
    assert v["broker-image"] == written["broker"] and v["influxdb-image"] == written["influxdb"]
    assert "mosquitto" in v and "influxdb" in v  # the package pins stay recorded (a switch back is no surprise)
    assert "worker-image" not in v  # the worker runs as a package on this platform


def test_a_package_platform_has_no_image_versions(tmp_path: Path) -> None:
    v = _versions(_spec(tmp_path, lambda d: d.update(runtime="package")), tmp_path / "b")
    assert not [k for k in v if k.endswith("-image")], v


def test_a_new_digest_is_a_change_rolled_from_the_brokers_host_with_the_digest_to_set_back(tmp_path: Path) -> None:
    old = _versions(_spec(tmp_path), tmp_path / "old")
    spec = _spec(tmp_path, lambda d: d["images"].update(broker=NEW))
    new = _versions(spec, tmp_path / "new")
    p = load_platform(spec)
    changed = upgrade.changes({"versions": old}, new, p)
    assert [(c.service, c.old, c.new) for c in changed] == [("broker-image", old["broker-image"], NEW)]
    assert upgrade.rolling_order(p, ["tsdb", "edge"], changed) == ["edge", "tsdb"]  # the broker's host first
    hint = upgrade.rollback_hint(changed, "platform.yaml")
    assert hint == (f"to roll back: set images.broker back to {old['broker-image']} in platform.yaml (and "
                    "images.archive.broker, if you give one, to that image's archive); then run `iotplat up` again "
                    "(it rolls back host by host the same way)")
    # the same digest again: nothing to roll; a first container deploy after the package runtime: nothing either
    assert upgrade.changes({"versions": new}, new, p) == []
    package_era = {k: val for k, val in old.items() if not k.endswith("-image")}
    assert upgrade.changes({"versions": package_era}, new, p) == []


def test_influxdb_and_broker_images_roll_in_deploy_order(tmp_path: Path) -> None:
    old = _versions(_spec(tmp_path), tmp_path / "old")
    influx = "influxdb:1.11.8@sha256:" + "2" * 64
    spec = _spec(tmp_path, lambda d: d["images"].update(broker=NEW, influxdb=influx))
    p = load_platform(spec)
    changed = upgrade.changes({"versions": old}, _versions(spec, tmp_path / "new"), p)
    assert [c.service for c in changed] == ["broker-image", "influxdb-image"]
    assert upgrade.rolling_order(p, ["tsdb", "edge"], changed) == ["edge", "tsdb"]
    assert "set images.influxdb back to " + old["influxdb-image"] in upgrade.rollback_hint(changed, "x.yaml")


def test_the_worker_image_key_is_its_base_and_rolls_back_to_that_pin(tmp_path: Path) -> None:
    """The worker's image is built from its wheelhouse (the `worker` version) on `images.worker_base`: the
    worker-image version is that base pin, read from the rendered `worker_container.pin`."""
    base = "python:3.13-slim-trixie@sha256:" + "3" * 64
    gv = {"iotplat_version": "0.1.0", "worker_container": {"pin": base, "image": {}}}
    assert Worker().versions(gv, None) == {"worker": "0.1.0", "worker-image": base}
    assert runtime.image_versions({"worker_container": {"image": {}}}, "worker", "worker") == {}
    assert Worker().rollback("worker-image", base, "p.yaml").startswith(f"set images.worker_base back to {base} in p.yaml")
    assert Worker().rollback("worker", "0.0.9+abc", "p.yaml") == "reinstall the iotplat release that deployed worker 0.0.9"


def test_the_rendered_pin_is_the_spec_s_written_reference(tmp_path: Path) -> None:
    spec = _spec(tmp_path, lambda d: d["images"].update(broker=NEW))
    render(str(spec), None, out_dir=str(tmp_path / "b"), state_dir=str(tmp_path / "state"))
    gv = yaml.safe_load((tmp_path / "b/ansible/group_vars/all.yml").read_text())
    assert gv["mosquitto_container"]["pin"] == NEW
    assert gv["mosquitto_container"]["image"]["pinned"] == "eclipse-mosquitto@sha256:" + "1" * 64
