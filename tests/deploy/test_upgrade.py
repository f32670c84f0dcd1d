"""A version upgrade on real throw-away hosts: the 3-host local example is deployed with the older Debian package
of Mosquitto (2.0.11-1.2+deb12u1, from bookworm-security), then the spec pins the newer one (deb12u2, bookworm):
`plan` names the upgrade and exits 3, `up` rolls it out one host at a time with the end-to-end canary green
after each host, and the broker really runs the new package. Then an upgrade to a version apt does not have
stops on the first host, names the hosts left alone and says how to roll back, and the platform keeps working.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import local_platform, module_env, run_cli
from tests.helpers import EXAMPLES

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
NETWORK = "10.220.0.0/24"
OLD, NEW, MISSING = "2.0.11-1.2+deb12u1", "2.0.11-1.2+deb12u2", "2.0.11-1.2+deb12u99"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    def edit(spec: dict) -> None:
        spec["name"], spec["target"]["network"] = "upg", NETWORK

    yield from local_platform(tmp_path_factory.mktemp("upg"), EXAMPLES / "local" / "platform.yaml", edit)


@pytest.fixture(autouse=True)
def _env(isolated_state, platform: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    module_env(platform, monkeypatch)


def _pin(ctx: dict, version: str) -> None:
    path = Path(ctx["spec"])
    data = yaml.safe_load(path.read_text())
    data.setdefault("broker", {})["version"] = version
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _broker_package(ctx: dict) -> str:
    """"<version> <status>" of the broker package on edge; "hi" = installed and held at the pin."""
    from iotplat.deploy.targets import local_settings
    from iotplat.hosts import local_provider
    from iotplat.spec.load import load_platform

    provider = local_provider(local_settings(load_platform(Path(ctx["spec"]))))
    out = provider.exec("edge", ["dpkg-query", "-W", "-f", "${Version} ${db:Status-Abbrev}", "mosquitto"])
    return out.stdout.strip()


def test_01_deploy_the_older_package(platform: dict, capfd) -> None:
    _pin(platform, OLD)
    code, out, err = run_cli(capfd, "up", platform["spec"], "--out", platform["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    result = json.loads(out)
    assert result["ok"] is True and result["upgraded"] == []
    assert _broker_package(platform).startswith(OLD + " hi"), _broker_package(platform)


def test_02_plan_names_the_upgrade(platform: dict, capfd) -> None:
    _pin(platform, NEW)
    code, out, err = run_cli(capfd, "plan", platform["spec"], "--out", platform["build"], "--json")
    assert code == 3, (out + err)[-3000:]
    result = json.loads(out)
    assert result["upgrades"] == [{"service": "mosquitto", "old": OLD, "new": NEW}]
    assert any(c["host"] == "edge" and "Mosquitto" in c["task"] for c in result["changes"]), result["changes"]


def test_03_up_rolls_host_by_host_with_the_canary_after_each(platform: dict, capfd) -> None:
    code, out, err = run_cli(capfd, "up", platform["spec"], "--out", platform["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    result = json.loads(out)
    assert result["upgraded"] == [{"service": "mosquitto", "old": OLD, "new": NEW}]
    assert result["ok"] is True
    text = out + err
    # edge (the broker's host) first, then the others, each followed by a green canary
    positions = [text.index(f"canary ok after {h}") for h in ("edge", "tsdb", "dash")]
    assert positions == sorted(positions), text[-3000:]
    assert _broker_package(platform).startswith(NEW + " hi"), _broker_package(platform)
    code, out, _ = run_cli(capfd, "plan", platform["spec"], "--out", platform["build"], "--json")
    assert code == 0 and json.loads(out)["upgrades"] == []


def test_04_a_failed_upgrade_stops_on_the_first_host_and_says_how_to_roll_back(platform: dict, capfd) -> None:
    _pin(platform, MISSING)
    code, out, err = run_cli(capfd, "up", platform["spec"], "--out", platform["build"])
    assert code == 1, (out + err)[-3000:]
    message = out + err
    assert "upgrade stopped on edge (hosts not yet upgraded: tsdb, dash)" in message, message[-3000:]
    assert f"set broker.version back to {NEW}" in message, message[-3000:]
    assert "canary ok after" not in message
    assert _broker_package(platform).startswith(NEW + " hi")  # nothing was changed on the broker
    _pin(platform, NEW)
    code, out, err = run_cli(capfd, "status", platform["spec"], "--out", platform["build"], "--json")
    assert code == 0 and json.loads(out)["ok"] is True, (out + err)[-3000:]
