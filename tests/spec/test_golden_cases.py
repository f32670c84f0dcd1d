"""Error-quality golden tests: each folder under cases/ is a spec (plus any files it references) and
expected.txt, the exact stderr of `iotplat validate platform.yaml` followed by `exit N`. The messages are
user interface: review a change to expected.txt like a change to UI text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "cases"
# a path: dotted words and [n], and keys that are not plain words as JSON strings: environments["prod\n"]
LINE = re.compile(r'^[^:]+:\d+:\d+: (?:[\w\[\].()-]|\["(?:[^"\\]|\\.)*"\])+: .+$')


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden(case: str, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = CASES / case
    monkeypatch.chdir(folder)
    result = cli("validate", "platform.yaml")
    expected = (folder / "expected.txt").read_text()
    actual = result.err + f"exit {result.code}\n"
    assert actual == expected
    assert "Traceback" not in result.err + result.out
    if result.code == 2:
        for line in result.err.splitlines():
            assert LINE.match(line), line
    else:
        assert result.code == 0 and case.startswith("valid")


def test_python_tag_executes_nothing(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = Path("/tmp/iotplat-pwned")
    marker.unlink(missing_ok=True)
    monkeypatch.chdir(CASES / "python_tag")
    assert cli("validate", "platform.yaml").code == 2
    assert not marker.exists()
