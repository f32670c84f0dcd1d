"""Every figure `iotplat cost` prints is pinned here: each folder under cases/ holds `args` (one CLI argument
per line, run from that folder), the spec and price files they name, `expected.txt` (stdout, then stderr,
then `exit N`) and `expected.json` (the --json document and its exit code).

The cases: both shipped cloud examples, the shipped default (local) spec, a bare-metal spec with and
without its hardware cost, a size and a region missing from the price table, a bad price file, and a
spec-level price file with a --prices file merged after it. The figures are review material: a change
to expected.txt is a change to what users are told their platform costs.

To regenerate after an intended change: IOTPLAT_REGENERATE_GOLDEN=1 pytest tests/cost (the run then
fails on purpose; review the diff before committing it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "cases"
REGENERATE = os.environ.get("IOTPLAT_REGENERATE_GOLDEN") == "1"


def _args(folder: Path) -> list[str]:
    return [line for line in (folder / "args").read_text().splitlines() if line]


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden(case: str, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = CASES / case
    monkeypatch.chdir(folder)
    text = cli("cost", *_args(folder))
    as_json = cli("cost", *_args(folder), "--json")
    actual_text = text.out + text.err + f"exit {text.code}\n"
    actual_json = json.dumps({"exit": as_json.code, "stdout": json.loads(as_json.out)}, indent=2, sort_keys=True) + "\n"
    if REGENERATE:
        (folder / "expected.txt").write_text(actual_text)
        (folder / "expected.json").write_text(actual_json)
        pytest.fail(f"regenerated {case}: review the diff")
    assert actual_text == (folder / "expected.txt").read_text()
    assert actual_json == (folder / "expected.json").read_text()
    assert "Traceback" not in text.err + as_json.err
    assert text.code == as_json.code
    if case in ("missing_size", "missing_region", "bad_override", "baremetal_without_hardware_cost"):
        assert text.code == 2 and text.out == ""
        assert json.loads(as_json.out)["ok"] is False
    else:
        assert text.code == 0 and text.err == ""
        assert json.loads(as_json.out)["ok"] is True
