"""Hostile and broken input never produces a traceback, never executes anything, and is cheap to reject."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from iotplat.errors import SpecInvalid
from iotplat.spec.yamlio import load_yaml_text


def _validate(cli, path: Path):
    return cli("validate", str(path))


def test_missing_file(cli, tmp_path: Path) -> None:
    r = _validate(cli, tmp_path / "nope.yaml")
    assert r.code == 2
    assert r.err.strip() == f"iotplat: error: {tmp_path / 'nope.yaml'}: no such file (create one with `iotplat init`)"


def test_directory(cli, tmp_path: Path) -> None:
    r = _validate(cli, tmp_path)
    assert r.code == 2 and "is a directory" in r.err and len(r.err.splitlines()) == 1


def test_unreadable_path(cli, tmp_path: Path) -> None:
    """A read error (here: a path through a regular file) is one line, exit 2 (root can read any mode)."""
    f = tmp_path / "file"
    f.write_text("x")
    r = _validate(cli, f / "platform.yaml")
    assert r.code == 2 and len(r.err.splitlines()) == 1 and "platform.yaml" in r.err


def test_oversized_file(cli, tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    p.write_text("apiVersion: iotplat/v1\ndescription: " + "x" * (1024 * 1024 + 10) + "\n")
    r = _validate(cli, p)
    assert r.code == 2
    assert "the limit is 1,048,576" in r.err and len(r.err.splitlines()) == 1


def test_billion_laughs_rejected_fast_and_small(tmp_path: Path) -> None:
    levels = ["a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 10) + "]")
    text = "\n".join(levels) + "\n"
    tracemalloc.start()
    t = time.process_time()  # CPU time: robust to other load on the machine
    with pytest.raises(SpecInvalid) as exc:
        load_yaml_text(text, "bomb.yaml", max_nodes=200_000)
    cpu = time.process_time() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert cpu < 1.0
    assert peak < 100 * 1024 * 1024
    assert "alias bomb" in str(exc.value.problems[0])


def test_deep_nesting_rejected() -> None:
    with pytest.raises(SpecInvalid) as exc:
        load_yaml_text("a: " + "[" * 10000 + "]" * 10000 + "\n", "deep.yaml")
    assert exc.value.problems[0].line == 1
    with pytest.raises(SpecInvalid) as exc:
        load_yaml_text("a:\n" + "".join("  " * i + "- \n" for i in range(1, 100)), "deep2.yaml")
    assert "nested more than" in exc.value.problems[0].message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a: on\nb: yes\nc: NO\n", {"a": "on", "b": "yes", "c": "NO"}),
        ("a: 0755\nb: 0x1F\nc: 1_000\n", {"a": 755, "b": 31, "c": "1_000"}),
        ("a: 2024-01-01\nb: 1:20\n", {"a": "2024-01-01", "b": "1:20"}),
        ("a: ~\nb: null\nc: True\n", {"a": None, "b": None, "c": True}),
        ("a: '8883'\nb: !!str 12\n", {"a": "8883", "b": "12"}),
    ],
)
def test_yaml_12_scalars(text: str, expected: dict) -> None:
    assert load_yaml_text(text, "s.yaml").data == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a: !!binary aGVsbG8=\n", "unsupported YAML tag '!!binary'"),
        ("a: !custom x\n", "unsupported YAML tag '!custom'"),
        ("? [1, 2]\n: x\n", "a key must be a plain value"),
        ("a: 1\n---\nb: 2\n", "YAML syntax error"),
        ("a: \x07\n", "not readable as YAML"),
        ("a: [1, 2\n", "YAML syntax error"),
    ],
)
def test_rejections_are_one_line_with_position(text: str, fragment: str) -> None:
    with pytest.raises(SpecInvalid) as exc:
        load_yaml_text(text, "x.yaml")
    lines = exc.value.lines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("x.yaml:")


def test_positions_point_at_values_and_keys() -> None:
    doc = load_yaml_text("top:\n  inner:\n    - a\n    - b: 2\n", "p.yaml")
    assert doc.where(("top", "inner", 1, "b")) == (4, 10)
    assert doc.where(("top", "inner", 1, "b"), key=True) == (4, 7)
    assert doc.where(("top", "missing", "deeper")) == (2, 3)
