"""The build directory is iotplat's alone (issue 9): render never deletes a file it did not write, never writes
into the state root, never follows a symbolic link below the build directory; a refusal is one line, exit 2, and
nothing changes (neither the folder nor the state)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, PLATFORM_DIR

SPEC = str(PLATFORM_DIR / "platform.yaml")


def _snapshot(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


def _refused(r, *words: str) -> None:
    assert r.code == 2, (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r.err
    for w in words:
        assert w in r.err, r.err


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A folder of the user's: a spec, a registry, a README (what `--out .` in a spec folder would hit)."""
    folder = tmp_path / "myplatform"
    folder.mkdir()
    (folder / "platform.yaml").write_text((PLATFORM_DIR / "platform.yaml").read_text())
    (folder / "devices.csv").write_text((PLATFORM_DIR / "devices.csv").read_text())
    (folder / "README.md").write_text("# my platform\n")
    return folder


def test_render_refuses_a_folder_it_did_not_write(cli, user_folder: Path, isolated_state: Path) -> None:
    before = _snapshot(user_folder)
    r = cli("render", SPEC, "--out", str(user_folder))
    _refused(r, str(user_folder), "did not write")
    assert _snapshot(user_folder) == before
    assert not (isolated_state / "demo").exists()  # refused before the state was touched
    r = cli("render", SPEC, "--out", str(user_folder), "--json")
    assert r.code == 2 and json.loads(r.out)["exit_code"] == 2 and "did not write" in json.loads(r.out)["error"]


def test_render_into_an_empty_or_absent_folder_works(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert cli("render", SPEC, "--out", str(tmp_path / "empty")).code == 0
    assert cli("render", SPEC, "--out", str(tmp_path / "new" / "sub")).code == 0
    assert (tmp_path / "empty" / "manifest.json").exists() and (tmp_path / "new" / "sub" / "manifest.json").exists()
    assert not list(tmp_path.rglob(".iotplat-*"))


def test_every_command_that_renders_refuses_it_too(cli, user_folder: Path, isolated_state: Path) -> None:
    before = _snapshot(user_folder)
    for command in (["status"], ["plan"], ["logs"], ["backup"], ["rotate", "secrets"], ["rotate", "certs"],
                    ["destroy", "--yes"]):
        r = cli(*command, SPEC, "--out", str(user_folder))
        _refused(r, "did not write")
        assert _snapshot(user_folder) == before, command
    assert not (isolated_state / "demo").exists()


def test_render_refuses_the_state_root_inside_it_or_around_it(cli, tmp_path: Path, isolated_state: Path) -> None:
    assert cli("render", SPEC, "--out", str(tmp_path / "b")).code == 0  # the state now holds a CA and credentials
    before = _snapshot(isolated_state)
    ca = isolated_state / "demo" / "default" / "secrets.vault"
    assert ca.exists()
    for out in (isolated_state, isolated_state / "demo" / "default", isolated_state / "new-folder",
                isolated_state.parent):
        r = cli("render", SPEC, "--out", str(out))
        _refused(r, "state root")
        assert _snapshot(isolated_state) == before, out
    # the state root given as --state-dir, the build dir around it (an empty folder apart from the state)
    outer = tmp_path / "outer"
    r = cli("render", SPEC, "--out", str(outer), "--state-dir", str(outer / "state"))
    _refused(r, "contains the state root")
    assert not outer.exists()
    # reached through a symbolic link to the state root
    link = tmp_path / "link-to-state"
    link.symlink_to(isolated_state)
    _refused(cli("render", SPEC, "--out", str(link / "demo")), "state root")
    assert _snapshot(isolated_state) == before


def test_a_symlinked_folder_inside_the_build_dir_is_never_followed(cli, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert cli("render", SPEC, "--out", str(out)).code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the user's")
    etc = out / "hosts" / "core" / "etc"
    for p in sorted(etc.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    etc.rmdir()
    etc.symlink_to(elsewhere)
    before, outside = _snapshot(out), _snapshot(elsewhere)
    r = cli("render", SPEC, "--out", str(out))
    _refused(r, "symbolic link", "hosts/core/etc")
    assert _snapshot(out) == before and _snapshot(elsewhere) == outside

    # a link where a file goes: neither followed nor written through
    etc.unlink()
    assert cli("render", SPEC, "--out", str(out)).code == 0
    victim = tmp_path / "victim.yml"
    victim.write_text("precious\n")
    (out / "ansible" / "site.yml").unlink()
    (out / "ansible" / "site.yml").symlink_to(victim)
    r = cli("render", SPEC, "--out", str(out))
    _refused(r, "symbolic link", "site.yml")
    assert victim.read_text() == "precious\n"


def test_only_files_the_previous_manifest_lists_are_removed(cli, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert cli("render", str(EXAMPLES / "local" / "platform.yaml"), "--out", str(out)).code == 0
    (out / "hosts" / "tsdb" / "mine.txt").write_text("not iotplat's")
    (out / "ansible" / "notes.md").write_text("mine too")
    r = cli("render", SPEC, "--out", str(out), "--json")
    assert r.code == 0
    removed = json.loads(r.out)["removed"]
    assert removed and not any(n.endswith(("mine.txt", "notes.md")) for n in removed)
    assert (out / "hosts" / "tsdb" / "mine.txt").read_text() == "not iotplat's"
    assert (out / "ansible" / "notes.md").read_text() == "mine too"
    assert not (out / "hosts" / "edge").exists()  # every file in it was iotplat's


def test_a_forged_manifest_cannot_make_render_delete_outside_or_foreign_files(cli, tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "README.md").write_text("mine")
    forged = {"apiVersion": "iotplat/v1", "files": [{"path": "../victim.txt"}, {"path": "README.md"},
                                                    {"path": "/etc/hostname"}],
              "artifacts": {"ansible/../../victim.txt": "", "hosts/../README.md": ""}}
    (out / "manifest.json").write_text(json.dumps(forged))
    assert cli("render", SPEC, "--out", str(out)).code == 0
    assert victim.read_text() == "precious" and (out / "README.md").read_text() == "mine"
    assert Path("/etc/hostname").exists()
    # a manifest.json that is not iotplat's does not make the folder iotplat's
    other = tmp_path / "webapp"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    _refused(cli("render", SPEC, "--out", str(other)), "did not write")
    assert [p.name for p in other.iterdir()] == ["manifest.json"]


def test_an_interrupted_first_render_leaves_a_folder_the_next_render_owns(cli, tmp_path: Path, monkeypatch) -> None:
    """A crash (here: an error) after some files were written and before manifest.json: the journal names them,
    so the next render neither refuses the folder nor leaves the first render's files behind."""
    from iotplat.render import engine

    out = tmp_path / "b"
    real_write = engine._write_at
    calls = {"n": 0}

    def failing_write(dir_fd: int, base: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(28, "No space left on device")
        real_write(dir_fd, base, data)

    monkeypatch.setattr(engine, "_write_at", failing_write)
    r = cli("render", str(EXAMPLES / "local" / "platform.yaml"), "--out", str(out))
    assert r.code == 1 and "cannot write the build directory" in r.err
    assert not (out / "manifest.json").exists() and (out / ".iotplat-pending.json").exists()
    written_then = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert any(n.startswith("hosts/dash/") for n in written_then)
    monkeypatch.setattr(engine, "_write_at", real_write)
    r = cli("render", SPEC, "--out", str(out), "--json")  # another platform, one host `core`
    assert r.code == 0, r.err
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not any(n.startswith(("hosts/dash/", "hosts/edge/", "hosts/tsdb/")) for n in left)
    assert ".iotplat-pending.json" not in left and not any(n.endswith(".iotplat-tmp") for n in left)

    # interrupted again, this time before anything new was written: the next render still removes the journal
    (out / ".iotplat-pending.json").write_text(json.dumps({"apiVersion": "iotplat/v1", "pending": ["hosts/x/y"]}))
    (out / "hosts" / "x").mkdir()
    (out / "hosts" / "x" / "y").write_text("written by the interrupted render")
    r = cli("render", SPEC, "--out", str(out), "--json")
    assert r.code == 0 and json.loads(r.out)["removed"] == ["hosts/x/y"] and json.loads(r.out)["written"] == []
    assert not (out / ".iotplat-pending.json").exists() and not (out / "hosts" / "x").exists()


def test_out_that_is_a_file_is_refused(cli, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    _refused(cli("render", SPEC, "--out", str(f)), "not a folder")
    assert f.read_text() == "x"
