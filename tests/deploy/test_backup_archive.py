"""Backup archives are refused cleanly (exit 2, one line) when tampered, foreign or not an archive."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from iotplat.deploy.backup import open_archive
from iotplat.errors import InvalidInput
from iotplat.secrets.vault import Vault, key_file_path


def _seal(path: Path, members: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    path.write_bytes(Vault(key_file_path().read_bytes().strip()).encrypt(buf.getvalue()))


def test_good_archive_opens_and_bad_ones_are_refused(tmp_path: Path) -> None:
    state = b"state-bytes"
    info = {"format": 1, "platform": "p", "environment": "default", "created": "x",
            "members": {"state.tar": hashlib.sha256(state).hexdigest()}}
    good = tmp_path / "good.iotplat-backup"
    _seal(good, {"archive.json": json.dumps(info).encode(), "state.tar": state})
    assert open_archive(good)[1] == {"state.tar": state}

    wrong_member = tmp_path / "member.iotplat-backup"
    _seal(wrong_member, {"archive.json": json.dumps(info).encode(), "state.tar": b"other"})
    with pytest.raises(InvalidInput, match="does not match its checksum"):
        open_archive(wrong_member)

    no_info = tmp_path / "noinfo.iotplat-backup"
    _seal(no_info, {"state.tar": state})
    with pytest.raises(InvalidInput, match="not an iotplat backup archive"):
        open_archive(no_info)

    flipped = tmp_path / "flipped.iotplat-backup"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="integrity check"):
        open_archive(flipped)

    with pytest.raises(InvalidInput, match="cannot read the archive"):
        open_archive(tmp_path / "missing.iotplat-backup")


def test_archive_of_another_platform_or_influxdb_version_is_refused_before_anything_changes() -> None:
    from iotplat.deploy.backup import check_fits
    from iotplat.spec.load import load_platform
    from tests.helpers import EXAMPLES

    v1 = load_platform(EXAMPLES / "local" / "platform.yaml")
    v2 = load_platform(EXAMPLES / "aws" / "platform.yaml")
    assert v1.spec.influxdb.version == 1 and v2.spec.influxdb.version == 2
    info = {"platform": v1.name, "environment": v1.environment, "influxdb": {"version": 1}}
    check_fits(info, v1)  # fits: no exception
    with pytest.raises(InvalidInput, match="not " + v2.name):
        check_fits(info, v2)
    with pytest.raises(InvalidInput, match="InfluxDB 1 backup but the spec deploys InfluxDB 2"):
        check_fits({**info, "platform": v2.name, "environment": v2.environment}, v2)
