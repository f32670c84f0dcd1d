"""Spec fuzzing (hypothesis): mutations of valid specs never crash validate; every problem is one
well-formed line and the exit code is 0 or 2. Valid mutations render deterministically."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotplat.cli import main
from tests.helpers import EXAMPLES, PLATFORM_DIR

BASES = [yaml.safe_load((PLATFORM_DIR / "platform.yaml").read_text()),
         yaml.safe_load((EXAMPLES / "aws" / "platform.yaml").read_text()),
         yaml.safe_load((EXAMPLES / "local" / "platform.yaml").read_text())]
# FILE:LINE:COL: path: message -- path segments may be quoted keys such as fields[":"]
LINE = re.compile(r'^[^:]+:\d+:\d+: (?:[^:"]|"(?:[^"\\]|\\.)*")+: .+$')


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, prefix + (i,)))
    return out


values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.sampled_from(["8883", "yes", "5m", "1GiB", "devices/+/x", "$SYS/x", "0.0.0.0/0", "x" * 300, "\u0000", "é/ü"]),
)


@st.composite
def mutated(draw: st.DrawFn) -> dict:
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = draw(st.sampled_from(["delete", "replace", "add_key"]))
        if action == "delete":
            if isinstance(parent, dict):
                parent.pop(last, None)
            elif isinstance(parent, list) and len(parent) > 0:
                parent.pop(last)
        elif action == "replace":
            parent[last] = draw(values)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "listner", "topics", "name", "kind"]))] = draw(values)
    return data


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=mutated())
def test_mutated_specs_never_crash(data: dict, tmp_path_factory, capsys) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("devices.csv", "id_ed25519.pub"):
        src = EXAMPLES / "aws" / name
        (folder / name).write_bytes(src.read_bytes())
    path: Path = folder / "platform.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert lines
        for line in lines:
            assert LINE.match(line) or line.startswith("iotplat: error: "), line
