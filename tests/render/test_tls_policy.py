"""tls.min_version reaches every service's rendered configuration.

Mosquitto and InfluxDB 1.6.7 enforce it on real servers (test_rendered_broker.py, test_rendered_influxdb.py).
Grafana and InfluxDB 2 cannot be installed here: their files are checked statically, for the settings their
documentation names ([server] min_tls_version in grafana.ini; tls-min-version in InfluxDB 2's config.toml).
"""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path

import pytest
import yaml

from iotplat.commands import render
from tests.helpers import copy_example


def _render(tmp_path: Path, example: str, min_version: str) -> Path:
    spec = copy_example(example, tmp_path)
    data = yaml.safe_load(spec.read_text())
    data.setdefault("tls", {})["min_version"] = min_version
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "build"
    render(str(spec), None, out_dir=str(out))
    return out


@pytest.mark.parametrize(("example", "version"), [("local", "1.2"), ("aws", "1.2"), ("aws", "1.3")])
def test_min_version_in_every_service_file(tmp_path: Path, example: str, version: str) -> None:
    out = _render(tmp_path, example, version)
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}

    def one(suffix: str) -> Path:
        found = [p for name, p in files.items() if name.endswith(suffix)]
        assert len(found) == 1, (suffix, sorted(files))
        return found[0]

    conf = one("/etc/mosquitto/mosquitto.conf").read_text().splitlines()
    tls_lines = [line for line in conf if line.startswith("tls_version ")]
    listeners = [line for line in conf if line.startswith("listener ")]
    assert tls_lines and len(tls_lines) == len(listeners) and set(tls_lines) == {f"tls_version tlsv{version}"}

    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(one("/etc/grafana/grafana.ini").read_text())
    assert ini["server"]["protocol"] == "https" and ini["server"]["min_tls_version"] == f"TLS{version}"

    influx = [p for name, p in files.items() if name.endswith(("/etc/influxdb/influxdb.conf", "/etc/influxdb/config.toml"))]
    assert len(influx) == 1
    cfg = tomllib.loads(influx[0].read_text())
    if influx[0].name == "influxdb.conf":
        assert cfg["tls"]["min-version"] == f"tls{version}"
        assert cfg["http"]["https-enabled"] is True and cfg["http"]["pprof-enabled"] is False
        assert all("GCM" in c or "CHACHA20" in c for c in cfg["tls"]["ciphers"])
    else:
        assert cfg["tls-min-version"] == version and cfg["pprof-disabled"] is True
