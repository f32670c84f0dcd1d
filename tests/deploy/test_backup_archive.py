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


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _members(state: bytes) -> dict[str, bytes]:
    return {"state.tar": state, "influxdb.tar": _tar({"meta.00": b"m"}), "mosquitto.db": b"db"}


def _info(members: dict[str, bytes]) -> dict:
    return {"format": 1, "platform": "p", "environment": "default", "created": "x",
            "members": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}}


def test_good_archive_opens_and_bad_ones_are_refused(tmp_path: Path) -> None:
    state = _tar({"secrets.vault": b"s", "mqtt-users.vault": b"u"})
    members = _members(state)
    info = _info(members)
    good = tmp_path / "good.iotplat-backup"
    _seal(good, {"archive.json": json.dumps(info).encode(), **members})
    assert open_archive(good)[1] == members

    wrong_member = tmp_path / "member.iotplat-backup"
    _seal(wrong_member, {"archive.json": json.dumps(info).encode(), **members, "state.tar": b"other"})
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
    info = {"platform": v1.name, "environment": v1.environment, "influxdb": {"version": 1},
            "members": {m: "0" * 64 for m in ("state.tar", "influxdb.tar", "mosquitto.db")}}  # (as open_archive checked)
    check_fits(info, v1)  # fits: no exception
    with pytest.raises(InvalidInput, match="not " + v2.name):
        check_fits(info, v2)
    with pytest.raises(InvalidInput, match="InfluxDB 1 backup but the spec deploys InfluxDB 2"):
        check_fits({**info, "platform": v2.name, "environment": v2.environment}, v2)


# ---------------------------------------------------------------------------- hostile archives (issue 9)


def _good(tmp_path: Path, name: str = "a.iotplat-backup", state: bytes | None = None,
          info_edit=None) -> Path:
    members = _members(state if state is not None else _tar({"secrets.vault": b"s"}))
    info = _info(members)
    if info_edit:
        info_edit(info)
    path = tmp_path / name
    _seal(path, {"archive.json": json.dumps(info).encode(), **members})
    return path


@pytest.mark.parametrize("sidecar", [b"", b"\n", b"\x00\xff\xfe binary", b"not-a-digest  a.iotplat-backup\n",
                                     b"\xe2\x9c\x93" * 30])
def test_an_empty_or_binary_checksum_file_is_refused_in_one_line(tmp_path: Path, sidecar: bytes) -> None:
    archive = _good(tmp_path)
    (tmp_path / "a.iotplat-backup.sha256").write_bytes(sidecar)
    with pytest.raises(InvalidInput, match="not a checksum file"):
        open_archive(archive)


def test_a_matching_checksum_file_is_accepted_and_a_wrong_one_refused(tmp_path: Path) -> None:
    archive = _good(tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    sums = tmp_path / "a.iotplat-backup.sha256"
    sums.write_text(f"{digest.upper()}  a.iotplat-backup\n")
    open_archive(archive)
    sums.write_text("0" * 64 + "  a.iotplat-backup\n")
    with pytest.raises(InvalidInput, match="does not match its checksum file"):
        open_archive(archive)
    sums.unlink()
    sums.mkdir()
    with pytest.raises(InvalidInput, match="not a regular file"):
        open_archive(archive)


def test_devices_fifos_and_folders_are_not_read(tmp_path: Path) -> None:
    """`restore --from /dev/zero` read forever; a FIFO would block."""
    import os

    fifo = tmp_path / "fifo.iotplat-backup"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo, tmp_path):
        with pytest.raises(InvalidInput, match="not a regular file"):
            open_archive(path)


def test_an_archive_larger_than_the_cap_is_refused_unread(tmp_path: Path, monkeypatch) -> None:
    from iotplat.deploy import backup

    archive = _good(tmp_path)
    monkeypatch.setattr(backup, "MAX_ARCHIVE_BYTES", archive.stat().st_size - 1)
    with pytest.raises(InvalidInput, match="larger than"):
        open_archive(archive)


@pytest.mark.parametrize("edit, words", [
    (lambda i: i.pop("members"), "no `members`"),
    (lambda i: i.update(members=[]), "no `members`"),
    (lambda i: i["members"].update({"state.tar": 5}), "no sha256"),
    (lambda i: i.pop("platform"), "no `platform`"),
    (lambda i: i["members"].pop("influxdb.tar"), "no influxdb.tar member"),
])
def test_archive_info_without_what_restore_reads_is_refused(tmp_path: Path, edit, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        open_archive(_good(tmp_path, info_edit=edit))


def test_archive_info_that_is_not_an_object_or_lists_too_little(tmp_path: Path) -> None:
    path = tmp_path / "list.iotplat-backup"
    _seal(path, {"archive.json": b"[1, 2]", "state.tar": b""})
    with pytest.raises(InvalidInput, match="not a JSON object"):
        open_archive(path)
    members = _members(_tar({"secrets.vault": b"s"}))
    info = _info(members)
    path = tmp_path / "extra.iotplat-backup"
    _seal(path, {"archive.json": json.dumps(info).encode(), **members, "grafana.db": b"unchecked"})
    with pytest.raises(InvalidInput, match="grafana.db is not listed"):
        open_archive(path)


def _crafted_state_tar(bad: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        good = tarfile.TarInfo("secrets.vault")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))
        bad.size = len(data) if bad.isfile() else 0
        tar.addfile(bad, io.BytesIO(data) if bad.isfile() else None)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    return ti


@pytest.mark.parametrize("bad", [
    tarfile.TarInfo("../../escaped"),
    tarfile.TarInfo("/etc/iotplat-escaped"),
    _link("evil-link", "/etc/passwd"),
    _link("evil-hard", "/etc/passwd", tarfile.LNKTYPE),
    _link("dev", "", tarfile.CHRTYPE),
])
def test_a_crafted_state_member_is_refused_before_any_member_is_extracted(tmp_path: Path, bad: tarfile.TarInfo) -> None:
    from iotplat.deploy.backup import restore_state

    state = _crafted_state_tar(bad, b"x")
    with pytest.raises(InvalidInput, match="state.tar member"):
        open_archive(_good(tmp_path, state=state))
    members = _members(state)
    target = tmp_path / "state" / "p" / "default"
    with pytest.raises(InvalidInput, match="refusing to restore"):
        restore_state(_info(members), members, target, "p", "default")
    assert not target.exists() or not any(target.iterdir())  # secrets.vault (the first member) was not extracted
    assert not (tmp_path / "escaped").exists() and not Path("/etc/iotplat-escaped").exists()


def test_restore_from_dev_zero_or_a_crafted_archive_is_exit_2_with_one_json_document(cli, tmp_path: Path,
                                                                                  isolated_state: Path) -> None:
    from tests.helpers import PLATFORM_DIR

    spec = str(PLATFORM_DIR / "platform.yaml")
    crafted = _good(tmp_path, state=_crafted_state_tar(tarfile.TarInfo("../../escaped"), b"x"))
    empty_sums = _good(tmp_path, name="b.iotplat-backup")
    (tmp_path / "b.iotplat-backup.sha256").write_bytes(b"")
    no_members = _good(tmp_path, name="c.iotplat-backup", info_edit=lambda i: i.pop("members"))
    for archive in ("/dev/zero", str(crafted), str(empty_sums), str(no_members)):
        r = cli("restore", spec, "--from", archive, "--yes", "--json", "--out", str(tmp_path / "b"))
        assert r.code == 2, (archive, r.err)
        assert json.loads(r.out)["exit_code"] == 2 and "internal error" not in r.err
        assert len(r.err.strip().splitlines()) == 1
    assert not (isolated_state / "demo").exists() and not (tmp_path / "escaped").exists()
