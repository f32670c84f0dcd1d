"""What `up` decides before it touches a host: which versions changed since the last deploy, in which order the
hosts are upgraded, and the roll-back hint (rendered builds of the shipped examples, no hosts)."""

from __future__ import annotations

from pathlib import Path

from iotplat.commands import render
from iotplat.deploy import upgrade
from iotplat.deploy.wheelhouse import write_checksums
from iotplat.spec.load import load_platform
from iotplat.spec.platform_model import release_pins
from tests.helpers import EXAMPLES

SPEC = EXAMPLES / "local" / "platform.yaml"  # edge: broker + worker, tsdb: influxdb, dash: grafana


def _versions(tmp_path: Path, wheelhouse: Path | None = None) -> dict[str, str]:
    render(str(SPEC), None, out_dir=str(tmp_path / "b"))
    return upgrade.versions(tmp_path / "b", wheelhouse)


def test_versions_come_from_the_rendered_pins_and_the_wheelhouse_digest(tmp_path: Path) -> None:
    p = load_platform(SPEC)
    v = _versions(tmp_path)
    assert v["mosquitto"] == "debian-12=2.0.11-1.2+deb12u2,debian-13=2.0.21-1" == upgrade.pin_text(p.mosquitto_pins)
    assert v["influxdb"] == upgrade.pin_text(release_pins(p.influx_package.version))
    assert v["grafana"] == p.spec.grafana.package.version  # one version for every release
    assert "+" not in v["worker"]  # no wheelhouse: the release only
    wh = tmp_path / "wh"
    wh.mkdir()
    (wh / "iotplat-0.1.0-py3-none-any.whl").write_bytes(b"wheel one")
    (wh / "requirements-worker.txt").write_text("paho-mqtt==2.2.0\n")
    write_checksums(wh)
    one = _versions(tmp_path, wh)["worker"]
    (wh / "iotplat-0.1.0-py3-none-any.whl").write_bytes(b"wheel two")  # same release number, new code
    write_checksums(wh)
    two = _versions(tmp_path, wh)["worker"]
    assert one.startswith(v["worker"] + "+") and two.startswith(v["worker"] + "+") and one != two


def test_changes_order_and_hint(tmp_path: Path) -> None:
    p = load_platform(SPEC)
    now = _versions(tmp_path)
    assert upgrade.changes(None, now, p) == []  # first deploy: nothing to roll
    assert upgrade.changes({"hosts": {}}, now, p) == []  # state from before versions were recorded
    assert upgrade.changes({"versions": now}, now, p) == []
    before = {**now, "influxdb": "1.6.6-1", "worker": "0.0.9"}
    changed = upgrade.changes({"versions": before}, now, p)
    assert [(c.service, c.old, c.new) for c in changed] == [("influxdb", "1.6.6-1", now["influxdb"]),
                                                           ("worker", "0.0.9", now["worker"])]
    # hosts of the changed services first, in service order (influxdb before worker), then the rest
    assert upgrade.rolling_order(p, ["edge", "tsdb", "dash"], changed) == ["tsdb", "edge", "dash"]
    hint = upgrade.rollback_hint(changed, "platform.yaml")
    assert hint == ("to roll back: set influxdb.package.version back to 1.6.6-1 in platform.yaml; reinstall the "
                    "iotplat release that deployed worker 0.0.9; then run `iotplat up` again (it rolls back host by "
                    "host the same way)")
