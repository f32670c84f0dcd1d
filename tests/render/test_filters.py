"""The per-format filters of the template engine, value by value (test_injection.py shows the schema lets no
hostile value reach them; these show what each filter does when one does)."""

from __future__ import annotations

import shlex
import tomllib

import jinja2
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from iotplat.render.engine import FILTERS, UnsafeValue, _env

# any text Python can write as UTF-8 (no lone surrogates)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_toml_strings_round_trip(key: str, value: str) -> None:
    """Every string, as a key and as a value, reads back unchanged with tomllib; a newline never ends the line."""
    toml = FILTERS["toml"]
    line = f"{toml(key)} = {toml(value)}"
    assert "\n" not in line and "\r" not in line
    assert tomllib.loads(line) == {key: value}


def test_toml_values() -> None:
    toml = FILTERS["toml"]
    doc = f"a = {toml([1, 2.5, True, 'x'])}\nb = {toml({'k': {'n': 'v'}})}\nc = {toml('😀')}\n"
    assert tomllib.loads(doc) == {"a": [1, 2.5, True, "x"], "b": {"k": {"n": "v"}}, "c": "😀"}
    with pytest.raises(UnsafeValue):
        toml(None)
    with pytest.raises(UnsafeValue):
        toml("\ud800")


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_grafana_yaml_scalar_round_trips_with_dollars_doubled(value: str) -> None:
    """A double-quoted YAML scalar on one line; `$` doubled, Grafana's escape for its $VAR/$__file{} expansion."""
    out = FILTERS["grafana_yaml"](value)
    assert "\n" not in out
    assert yaml.safe_load(f"key: {out}\nnext: 1\n") == {"key": value.replace("$", "$$"), "next": 1}


@pytest.mark.parametrize("value", ["a b", "a\nb", "a\tb", "x\x00", "x\u2028", "x\x85", ""])
def test_mosquitto_refuses_what_would_change_a_line(value: str) -> None:
    with pytest.raises(UnsafeValue):
        FILTERS["mosquitto"](value)


def test_mosquitto_and_path_and_ini_pass_closed_values() -> None:
    assert FILTERS["mosquitto"]("devices/%u/telemetry") == "devices/%u/telemetry"
    assert FILTERS["path"]("/etc/iotplat/tls/ca.crt") == "/etc/iotplat/tls/ca.crt"
    assert FILTERS["ini"]("grafana.example.com") == "grafana.example.com"
    for bad in ("/etc/a b", "relative", "/etc/$x", "/etc/}"):
        with pytest.raises(UnsafeValue):
            FILTERS["path"](bad)


@pytest.mark.parametrize("value", ["a;b", "a#b", "$__file{/etc/shadow}", "${HOME}", "%(x)s", '"q"', "a\nb", "a b"])
def test_ini_refuses_what_grafana_would_interpret(value: str) -> None:
    with pytest.raises(UnsafeValue):
        FILTERS["ini"](value)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zl", "Zp")), max_size=30))
def test_sh_quotes_one_word(value: str) -> None:
    assert shlex.split(f"cmd {FILTERS['sh'](value)} end") == ["cmd", value, "end"]


def test_systemd_doubles_percent_and_refuses_line_continuations() -> None:
    assert FILTERS["systemd"]("50% daily") == "50%% daily"
    for bad in ("a\\", "a\nb"):
        with pytest.raises(UnsafeValue):
            FILTERS["systemd"](bad)


def test_comment_is_one_line() -> None:
    assert FILTERS["comment"]("platform demo/default") == "platform demo/default"
    with pytest.raises(UnsafeValue):
        FILTERS["comment"]("x\nallow_anonymous true")


def test_a_template_cannot_print_an_unfiltered_string() -> None:
    """Jinja's finalize: numbers and filter output only, so a new template that forgets a filter fails at once."""
    env = _env()
    assert env.from_string("port {{ port }} host {{ host | mosquitto }}").render(port=8883, host="h") == "port 8883 host h"
    with pytest.raises(UnsafeValue):
        env.from_string("host {{ host }}").render(host="h")
    with pytest.raises(UnsafeValue):
        env.from_string("flag {{ flag }}").render(flag=True)
    assert isinstance(env, jinja2.Environment)
