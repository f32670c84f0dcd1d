"""Golden render trees: each folder here is a spec with the full build tree `iotplat render` must write for it.

    <case>/platform.yaml               the spec (+ the registry and key files it names)
    <case>/TEST-ONLY-vault-password    the vault key of the case's state: a test fixture that protects nothing
    <case>/state/<name>/<env>/*.vault  the state the case renders from (CA, server certificates, secrets,
                                       MQTT passwords and hashes), so every certificate and hash is fixed
    <case>/expected/                   the whole build directory: manifest.json, hosts/, ansible/, pulumi/

tests/render/test_golden.py renders every case into a temp folder from a COPY of its state and compares the
file list exactly and every file byte for byte. After an intended change to templates or the renderer:

    .venv/bin/python -m tests.render.golden --regenerate [CASE ...]   # rewrite expected/ (all cases if none)
    git diff tests/render/golden                                       # review it like code
    .venv/bin/python -m tests.render.golden --check                    # what the test does, without pytest

`--regenerate` also creates a case's state (and its TEST-ONLY key) when the case has none, and saves the state
back when the spec now needs more of it (a new device's password, a host's certificate): the report says which
state files changed. Certificates in these states are issued for 100 years (CERT_DAYS): a 397-day certificate
would come due for renewal a year after the state was made, and the golden trees would change by themselves.
See README.md in this folder for what each case covers.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

GOLDEN = Path(__file__).resolve().parent
REPO = GOLDEN.parents[2]
SPEC = "platform.yaml"
KEY_FILE = "TEST-ONLY-vault-password"
STATE = "state"
EXPECTED = "expected"
CERT_DAYS = 36500
STATE_FILES = ("secrets.vault", "mqtt-users.vault")  # what a state holds that render reads (lock, id: not inputs)
MAX_DIFF_LINES = 60  # per file in a failure report


def cases(root: Path = GOLDEN) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / SPEC).is_file())


def tree(root: Path) -> dict[str, bytes]:
    """Every file below `root` (dot files too) by its relative POSIX path."""
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def state_files(root: Path) -> dict[str, bytes]:
    return {name: data for name, data in tree(root).items() if name.rsplit("/", 1)[-1] in STATE_FILES}


@dataclass
class Rendered:
    case: str
    files: dict[str, bytes]  # the build tree
    state_before: dict[str, bytes]  # the case's committed state files
    state_after: dict[str, bytes]  # the same files after render (render saves only what it had to add)
    work: Path  # where it was rendered (out/, state/): absolute paths of it must not reach the files


@contextlib.contextmanager
def _environment(key: Path) -> Iterator[None]:
    """The vault key of the case, and nothing from the caller's environment that would change the render."""
    with mock.patch.dict(os.environ, {"IOTPLAT_VAULT_PASSWORD_FILE": str(key)}):  # restores all on exit
        os.environ.pop("IOTPLAT_STATE_DIR", None)
        os.environ.pop("IOTPLAT_ENV", None)
        yield


@contextlib.contextmanager
def long_lived_certificates() -> Iterator[None]:
    """While a case's state is made: the CA and the server certificates are valid for CERT_DAYS (the spec's
    server_cert_days is at most 825, and render renews a certificate 30 days before it expires)."""
    from iotplat.secrets import pki

    issue = pki.issue_server_cert

    def issue_long(ca: pki.CertKey, common_name: str, dns_names: list[str], days: int) -> pki.CertKey:
        return issue(ca, common_name, dns_names, CERT_DAYS)

    with mock.patch.object(pki, "issue_server_cert", issue_long), mock.patch.object(pki, "CA_DAYS", CERT_DAYS):
        yield


class RenderFailed(Exception):
    pass


def render_case(case: str, work: Path, root: Path = GOLDEN) -> Rendered:
    """`iotplat render <case>/platform.yaml --out <work>/out --state-dir <work>/state` from a copy of the case's
    state and key (the committed files are never written)."""
    from iotplat.cli import main

    folder = root / case
    work.mkdir(parents=True, exist_ok=True)
    key = work / "vault-password"
    shutil.copyfile(folder / KEY_FILE, key)
    key.chmod(0o600)  # git keeps no file modes; the vault refuses a key others may read
    before = state_files(folder / STATE)
    if (folder / STATE).is_dir():
        shutil.copytree(folder / STATE, work / STATE)
    out, err = io.StringIO(), io.StringIO()
    with _environment(key), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["render", str(folder / SPEC), "--out", str(work / "out"), "--state-dir", str(work / STATE)])
    if code != 0:
        raise RenderFailed(f"{case}: iotplat render exited {code}: {err.getvalue().strip() or out.getvalue().strip()}")
    return Rendered(case, tree(work / "out"), before, state_files(work / STATE), work)


def _text(data: bytes) -> list[str] | None:
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def differences(expected: dict[str, bytes], actual: dict[str, bytes]) -> list[str]:
    """A readable report, empty when the trees are the same: missing and unexpected files, then a unified diff
    of every changed file (at most MAX_DIFF_LINES lines each)."""
    lines: list[str] = []
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(n for n in set(expected) & set(actual) if expected[n] != actual[n])
    lines += [f"missing (in expected/, not rendered): {n}" for n in missing]
    lines += [f"unexpected (rendered, not in expected/): {n}" for n in extra]
    for name in changed:
        old, new = _text(expected[name]), _text(actual[name])
        if old is None or new is None:
            lines.append(f"changed: {name} (binary: {len(expected[name])} -> {len(actual[name])} bytes, sha256 "
                         f"{hashlib.sha256(expected[name]).hexdigest()[:12]} -> {hashlib.sha256(actual[name]).hexdigest()[:12]})")
            continue
        diff = list(difflib.unified_diff(old, new, f"expected/{name}", f"rendered/{name}", n=2))
        lines.append(f"changed: {name}")
        lines += [d.rstrip("\n") for d in diff[:MAX_DIFF_LINES]]
        if len(diff) > MAX_DIFF_LINES:
            lines.append(f"... ({len(diff) - MAX_DIFF_LINES} more diff lines)")
    return lines


def check(case: str, work: Path, root: Path = GOLDEN) -> list[str]:
    """Render `case` and compare it with its expected/ tree; the problems found (empty: byte-identical)."""
    rendered = render_case(case, work, root)
    problems = differences(tree(root / case / EXPECTED), rendered.files)
    needles = {str(REPO), str(root), str(work.resolve())}  # no absolute path of this machine in a build file
    problems += [f"{name}: holds the absolute path {n} (a build tree must not depend on where it is rendered)"
                 for name, data in sorted(rendered.files.items()) for n in sorted(needles) if n.encode() in data]
    if rendered.state_after != rendered.state_before:
        changed = sorted(n for n in set(rendered.state_before) | set(rendered.state_after)
                         if rendered.state_before.get(n) != rendered.state_after.get(n))
        problems.append(f"render had to add to the case's state ({', '.join(changed)}): the committed state lacks a "
                        "secret, password or certificate the spec needs, so the output holds random new values")
    if problems:
        where = root / case / EXPECTED
        shown = where.relative_to(REPO) if where.is_relative_to(REPO) else where
        problems = [f"golden render tree {case!r} differs from {shown}/:", *problems,
                    f"if the change is intended: .venv/bin/python -m tests.render.golden --regenerate {case}, "
                    "then review `git diff tests/render/golden`"]
    return problems


def regenerate(case: str, work: Path, root: Path = GOLDEN) -> list[str]:
    """Rewrite <case>/expected/ (and create or complete the case's state); returns what it changed."""
    folder = root / case
    notes: list[str] = []
    if not (folder / KEY_FILE).exists():
        (folder / KEY_FILE).write_text(f"TEST-ONLY-golden-render-key-{case}-{secrets.token_hex(16)}\n")
        notes.append(f"created {KEY_FILE}")
    with long_lived_certificates():
        rendered = render_case(case, work, root)
    for name, data in sorted(rendered.state_after.items()):
        if rendered.state_before.get(name) != data:
            dest = folder / STATE / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            notes.append(f"{'updated' if name in rendered.state_before else 'created'} {STATE}/{name}")
    old = tree(folder / EXPECTED)
    if old != rendered.files:
        shutil.rmtree(folder / EXPECTED, ignore_errors=True)
        for name, data in rendered.files.items():
            dest = folder / EXPECTED / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        changed = sum(1 for n in set(old) | set(rendered.files) if old.get(n) != rendered.files.get(n))
        notes.append(f"rewrote {EXPECTED}/ ({changed} of {len(rendered.files)} files changed)")
    return notes


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.render.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--regenerate", action="store_true", help="rewrite expected/ (and create a missing state)")
    mode.add_argument("--check", action="store_true", help="compare every case with expected/, like the test")
    parser.add_argument("case", nargs="*", help=f"cases to process (default: all: {', '.join(cases())})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.case) - set(cases()))
    if unknown:
        parser.error(f"no such case: {', '.join(unknown)} (cases: {', '.join(cases())})")
    failed = False
    for case in args.case or cases():
        with tempfile.TemporaryDirectory(prefix=f"golden-{case}-") as tmp:
            try:
                lines = regenerate(case, Path(tmp)) if args.regenerate else check(case, Path(tmp))
            except RenderFailed as exc:
                lines, failed = [str(exc)], True
        if args.regenerate:
            print(f"{case}: " + ("; ".join(lines) if lines else "unchanged"))
        else:
            failed = failed or bool(lines)
            print("\n".join(lines) if lines else f"{case}: identical")
    return 1 if failed else 0
