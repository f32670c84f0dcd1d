"""Payload decoders, found through the ``iotplat.decoders`` entry point group.

A decoder is a class constructed once per subscription::

    DecoderClass(subscription: iotplat.worker.config.Subscription,
                 limits: iotplat.worker.config.LimitsConfig)

with one method::

    decode(payload: bytes, tags: dict[str, str], received_ns: int) -> list[Point | bytes]

``tags`` holds the topic template's named levels plus the subscription's extra tags. It returns
``Point`` objects (checked and encoded by the worker) or, for the built-in fast paths, already checked
line-protocol ``bytes``. It signals a bad message by raising ``Rejected(reason, detail)``; anything
else it raises becomes a ``decoder_error`` dead letter (the worker never dies of a payload).
The constructor may raise ``ValueError`` for bad ``[subscriptions.options]``: that is a config error.
See docs/worker.md for writing one (e.g. SenML).
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime
from importlib import metadata
from typing import Any, Callable

from .config import ConfigError, LimitsConfig, Subscription, WorkerConfig
from .lineproto import (
    INT64_MAX,
    INT64_MIN,
    TS_MAX_NS,
    TS_MIN_NS,
    Point,
    Reason,
    Rejected,
    escape_key,
    escape_string_value,
    tag_prefix,
)

ENTRY_POINT_GROUP = "iotplat.decoders"

__all__ = ["Decoder", "JsonDecoder", "LineProtocolDecoder", "RawDecoder", "Point", "Reason", "Rejected",
           "load_decoder_class", "available_decoders", "build_decoders", "ENTRY_POINT_GROUP"]


class Decoder:
    """Base class (optional: any class with the same constructor and ``decode`` works)."""

    def __init__(self, subscription: Subscription, limits: LimitsConfig) -> None:
        self.subscription = subscription
        self.limits = limits
        self.options = dict(subscription.options)

    def decode(self, payload: bytes, tags: dict[str, str], received_ns: int) -> list[Point | bytes]:
        raise NotImplementedError

    def check_options(self, allowed: dict[str, type | tuple[type, ...]]) -> None:
        for k, v in self.options.items():
            if k not in allowed:
                raise ValueError(f"unknown option {k!r} for format {self.subscription.format!r}; "
                                 f"allowed: {', '.join(sorted(allowed)) or 'none'}")
            if not isinstance(v, allowed[k]) or isinstance(v, bool) and allowed[k] is not bool:
                raise ValueError(f"option {k!r} has the wrong type")


# ---------------------------------------------------------------------------------------------
# helpers shared by the built-in decoders

_TS_FACTORS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def _nonfinite(name: str) -> Any:
    raise Rejected(Reason.NON_FINITE, f"JSON constant {name} is not a finite number")


def _decode_utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(Reason.INVALID_UTF8, f"byte {e.start} is not UTF-8") from None


_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET_RE = re.compile(r"[\[\]{}]")


def _check_depth(text: str, max_depth: int) -> None:
    """Reject nesting deeper than ``max_depth`` before parsing (json would recurse)."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    for m in _BRACKET_RE.finditer(_STRING_RE.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                raise Rejected(Reason.TOO_COMPLEX, f"JSON nesting deeper than {max_depth}")
        else:
            depth -= 1


def _lookup(doc: Any, path: tuple[str, ...]) -> Any:
    cur = doc
    for part in path:
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit():
            i = int(part)
            if i >= len(cur):
                return _MISSING
            cur = cur[i]
        else:
            return _MISSING
    return cur


_MISSING = object()


def _time_from(value: Any, unit: str, field: str) -> int:
    if unit == "rfc3339":
        if not isinstance(value, str) or len(value) > 64:
            raise Rejected(Reason.BAD_TIMESTAMP, f"{field!r} must be an RFC 3339 string")
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise Rejected(Reason.BAD_TIMESTAMP, f"{field!r} is not RFC 3339") from None
        if dt.tzinfo is None:
            raise Rejected(Reason.BAD_TIMESTAMP, f"{field!r} has no time zone")
        try:
            ts = int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
        except (OverflowError, ValueError, OSError):
            raise Rejected(Reason.BAD_TIMESTAMP, f"{field!r} is out of range") from None
    else:
        t = type(value)
        if t is int:
            ts = value * _TS_FACTORS[unit]
        elif t is float:
            if not math.isfinite(value):
                raise Rejected(Reason.BAD_TIMESTAMP, f"{field!r} is not finite")
            ts = int(round(value * _TS_FACTORS[unit])) if abs(value) < 1e19 else TS_MAX_NS + 1
        else:
            raise Rejected(Reason.BAD_TIMESTAMP, f"{field!r} must be a number of {unit}")
    if ts < TS_MIN_NS or ts > TS_MAX_NS or ts < 0:
        raise Rejected(Reason.BAD_TIMESTAMP, f"{field!r} is outside the storable range")
    return ts


def _coerce(value: Any, typ: str, name: str) -> Any:
    t = type(value)
    if typ == "float":
        if t is float:
            if value != value or value in (math.inf, -math.inf):
                raise Rejected(Reason.NON_FINITE, f"field {name!r} is not finite")
            return value
        if t is int:
            try:
                return float(value)
            except OverflowError:
                raise Rejected(Reason.OUT_OF_RANGE, f"field {name!r} is too large for a float") from None
        raise Rejected(Reason.TYPE_MISMATCH, f"field {name!r} must be a number, got {_jtype(value)}")
    if typ == "int":
        if t is int:
            if value < INT64_MIN or value > INT64_MAX:
                raise Rejected(Reason.OUT_OF_RANGE, f"field {name!r} does not fit in int64")
            return value
        if t is float:
            if not math.isfinite(value):
                raise Rejected(Reason.NON_FINITE, f"field {name!r} is not finite")
            if value != int(value):
                raise Rejected(Reason.TYPE_MISMATCH, f"field {name!r} must be an integer, got {value!r}")
            if value < INT64_MIN or value > INT64_MAX:
                raise Rejected(Reason.OUT_OF_RANGE, f"field {name!r} does not fit in int64")
            return int(value)
        raise Rejected(Reason.TYPE_MISMATCH, f"field {name!r} must be an integer, got {_jtype(value)}")
    if typ == "bool":
        if t is bool:
            return value
        raise Rejected(Reason.TYPE_MISMATCH, f"field {name!r} must be true or false, got {_jtype(value)}")
    # string
    if t is str:
        if len(value) > 65536:
            raise Rejected(Reason.TOO_LARGE, f"field {name!r} is longer than 64 KiB")
        return value
    raise Rejected(Reason.TYPE_MISMATCH, f"field {name!r} must be a string, got {_jtype(value)}")


def _jtype(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
            list: "an array", type(None): "null"}.get(type(v), type(v).__name__)


def _fmt(v: Any, name: str) -> str:
    t = type(v)
    if t is float:
        return repr(v)
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return f"{v}i"
    return escape_string_value(v)


class _PrefixCache:
    """``measurement,tags`` per distinct tag set, escaped once (devices repeat their topics)."""

    def __init__(self, measurement: str, limit: int = 50_000) -> None:
        self.measurement = measurement
        self.limit = limit
        self.cache: dict[tuple[tuple[str, str], ...], str] = {}

    def get(self, tags: dict[str, str]) -> str:
        key = tuple(tags.items())
        p = self.cache.get(key)
        if p is None:
            p = tag_prefix(self.measurement, tags)
            if len(self.cache) >= self.limit:
                self.cache.clear()
            self.cache[key] = p
        return p


# ---------------------------------------------------------------------------------------------

class JsonDecoder(Decoder):
    """JSON objects, flat or nested.

    With ``[subscriptions.fields.*]`` declared, exactly those fields are taken (dot paths, declared
    types; a field that is absent is skipped unless ``required``). Without declarations every scalar
    leaf becomes a field: nested keys joined with ``_``, numbers stored as floats (so the first
    message never decides a field's type), booleans as booleans, strings as strings, null skipped.

    Options: ``max_future_seconds`` (default 300): a device timestamp further ahead is a
    ``bad_timestamp``.
    """

    def __init__(self, subscription: Subscription, limits: LimitsConfig) -> None:
        super().__init__(subscription, limits)
        self.check_options({"max_future_seconds": (int, float)})
        self.max_future_ns = int(float(self.options.get("max_future_seconds", 300)) * 1e9)
        if self.max_future_ns < 0:
            raise ValueError("option 'max_future_seconds' must be >= 0")
        self.prefixes = _PrefixCache(subscription.measurement)
        ts = subscription.timestamp
        self.ts_path = tuple(ts.field.split(".")) if ts else None
        self.ts_unit = ts.unit if ts else "ms"
        self.ts_name = ts.field if ts else None
        self.fields = [(escape_key(f.name, "field key") + "=", tuple(f.path.split(".")), f.type, f.required,
                        f.name) for f in subscription.fields.values()]
        self.max_depth = limits.max_json_depth
        self.max_fields = limits.max_fields
        self._json = json.JSONDecoder(parse_constant=_nonfinite)
        self.fast = _compile_json_fast(self)

    def line_prefix(self, tags: dict[str, str]) -> str:
        """``measurement,tags`` escaped (raises Rejected for a tag line protocol cannot carry)."""
        return self.prefixes.get(tags)

    def parse(self, payload: bytes) -> dict[str, Any]:
        text = _decode_utf8(payload)
        if not text.strip():
            raise Rejected(Reason.EMPTY_PAYLOAD, "payload is only whitespace")
        _check_depth(text, self.max_depth)
        try:
            doc = self._json.decode(text)
        except Rejected:
            raise
        except json.JSONDecodeError as e:
            raise Rejected(Reason.INVALID_JSON, f"{e.msg} at char {e.pos}") from None
        except ValueError as e:  # e.g. an integer with more than 4300 digits
            raise Rejected(Reason.OUT_OF_RANGE, str(e)[:120]) from None
        except RecursionError:
            raise Rejected(Reason.TOO_COMPLEX, "JSON nested too deeply") from None
        if type(doc) is not dict:
            raise Rejected(Reason.TYPE_MISMATCH, f"top-level JSON must be an object, got {_jtype(doc)}")
        return doc

    def decode(self, payload: bytes, tags: dict[str, str], received_ns: int) -> list[Point | bytes]:
        if self.fast is not None:
            try:
                prefix = self.prefixes.get(tags)
            except Rejected:
                prefix = None
            if prefix is not None:
                line = self.fast(payload, received_ns, prefix)
                if line is not None:
                    return [line]
        return self.decode_generic(payload, tags, received_ns)

    def decode_generic(self, payload: bytes, tags: dict[str, str], received_ns: int) -> list[Point | bytes]:
        """The reference implementation: every rule, every reason. ``fast`` must agree with it."""
        doc = self.parse(payload)
        ts = received_ns
        if self.ts_path is not None:
            raw_ts = doc.get(self.ts_path[0], _MISSING) if len(self.ts_path) == 1 else _lookup(doc, self.ts_path)
            if raw_ts is not _MISSING:
                ts = _time_from(raw_ts, self.ts_unit, self.ts_name or "")
                if ts > received_ns + self.max_future_ns:
                    raise Rejected(Reason.BAD_TIMESTAMP, f"{self.ts_name!r} is more than "
                                                         f"{self.max_future_ns // 10**9} s in the future")
        parts: list[str] = []
        if self.fields:
            for key_eq, path, typ, required, name in self.fields:
                v = doc.get(path[0], _MISSING) if len(path) == 1 else _lookup(doc, path)
                if v is _MISSING or v is None:
                    if required:
                        raise Rejected(Reason.MISSING_FIELD, f"required field {name!r} is missing")
                    continue
                parts.append(key_eq + _fmt(_coerce(v, typ, name), name))
        else:
            leaves: list[tuple[str, Any]] = []
            self._flatten(doc, "", leaves, 0)
            for k, v in leaves:
                if self.ts_name is not None and k == self.ts_name.replace(".", "_"):
                    continue
                t = type(v)
                if t is int:
                    v = _coerce(v, "float", k)
                elif t is float:
                    v = _coerce(v, "float", k)
                elif t is str:
                    v = _coerce(v, "string", k)
                parts.append(escape_key(k, "field key") + "=" + _fmt(v, k))
        if not parts:
            raise Rejected(Reason.MISSING_FIELD, "no fields to store")
        return [f"{self.prefixes.get(tags)} {','.join(parts)} {ts}".encode()]

    def _flatten(self, obj: Any, prefix: str, out: list[tuple[str, Any]], depth: int) -> None:
        items = obj.items() if isinstance(obj, dict) else ((str(i), v) for i, v in enumerate(obj))
        for k, v in items:
            key = f"{prefix}_{k}" if prefix else k
            if isinstance(v, (dict, list)):
                self._flatten(v, key, out, depth + 1)
            elif v is not None:
                out.append((key, v))
                if len(out) > self.max_fields:
                    raise Rejected(Reason.TOO_COMPLEX, f"more than {self.max_fields} fields")


# ---------------------------------------------------------------------------------------------
# The JSON fast path: one straight-line function per subscription, generated once.
#
# Why generated code: with declared fields, the generic decoder spends most of its time in the
# interpreter looping over field specs, dispatching on types and building lists. A function written
# for exactly this subscription's fields (``seq`` int, ``temp`` float, ...) does the same checks in a
# fraction of the bytecode. It only ever handles the ordinary case and says "not me" (None) for
# anything else -- invalid or odd JSON, a missing field, a value of another type, NaN, a timestamp out
# of range -- so the generic decoder, which gives every dead-letter reason, stays the one place where
# rules live. ``tests/worker/test_decoders.py`` checks on generated documents that both agree.
# The generated source holds only our own identifiers (f0, f1, s_K0, ...); field names, keys and limits
# reach it as values in its namespace, never as source text. The worker calls it per message with the
# topic's prefix computed once (core.py, ``Worker._route``).

_WS = " \t\n\r"


class Decline(Exception):
    """Raised inside generated fast-path code: "not the ordinary case, ask the generic decoder"."""


_DECLINE = Decline()


def json_fast_source(dec: "JsonDecoder") -> tuple[list[str], dict[str, Any]] | None:
    """The fast path of ``dec`` as source lines (no indentation) and their namespace, or None for
    undeclared fields (the generic decoder flattens those).

    The lines read ``payload`` (bytes), ``received_ns`` (int) and ``prefix`` (the escaped ``measurement,tags``)
    and leave the line-protocol bytes in ``line``; anything out of the ordinary raises ``Decline`` (raising
    costs only on that rare path; the ordinary one runs straight through)."""
    if not dec.fields:
        return None
    t = "s_"
    ns: dict[str, Any] = {f"{t}scan": dec._json.scan_once, f"{t}MAXD": dec.max_depth, f"{t}FUT": dec.max_future_ns}
    # nesting: a document with no '[' and no '{' after the first character is one flat object (depth 1)
    # and needs no counting (two `in` tests cost a third of two str.count calls); otherwise, as many
    # brackets as the limit allows prove the depth is within it; more: the generic decoder measures it
    body = ["text = payload.decode()",
            "if ('[' in text or '{' in text[1:]) and text.count('{') + text.count('[') > " + f"{t}MAXD:",
            "    raise DECLINE",
            f"doc, end = {t}scan(text, 0)",
            "if end != len(text) and text[end:].strip(WS) or type(doc) is not dict:",
            "    raise DECLINE"]

    def get(var: str, path: tuple[str, ...], i: str) -> None:
        if len(path) == 1:
            ns[f"{t}K{i}"] = path[0]
            body.append(f"{var} = doc.get({t}K{i}, MISSING)")
        else:
            ns[f"{t}P{i}"] = path
            body.append(f"{var} = lookup(doc, {t}P{i})")

    if dec.ts_path is None:
        body.append("ts = received_ns")
    else:
        get("ts", dec.ts_path, "ts")
        if dec.ts_unit == "rfc3339":
            ns[f"{t}TSUNIT"], ns[f"{t}TSNAME"] = dec.ts_unit, dec.ts_name
            body += ["if ts is MISSING:",
                     "    ts = received_ns",
                     "else:",
                     f"    ts = time_from(ts, {t}TSUNIT, {t}TSNAME)",
                     f"    if ts > received_ns + {t}FUT:",
                     "        raise DECLINE"]
        else:
            ns[f"{t}TSF"] = _TS_FACTORS[dec.ts_unit]
            body += ["if ts is MISSING:",
                     "    ts = received_ns",
                     "else:",
                     "    if type(ts) is not int:",
                     "        raise DECLINE",
                     f"    ts *= {t}TSF",
                     f"    if ts < 0 or ts > TSMAX or ts > received_ns + {t}FUT:",
                     "        raise DECLINE"]
    out = []
    for i, (key_eq, path, typ, _required, _name) in enumerate(dec.fields):
        v = f"f{i}"
        ns[f"{t}E{i}"] = key_eq
        get(v, path, str(i))
        body.append(f"tp = type({v})")
        if typ == "int":
            body += [f"if tp is not int or {v} < IMIN or {v} > IMAX:",
                     "    raise DECLINE"]
            out.append(f"{{{t}E{i}}}{{{v}}}i")
        elif typ == "float":
            body += ["if tp is float:",
                     f"    if {v} - {v} != 0.0:",  # NaN or +-Infinity
                     "        raise DECLINE",
                     "elif tp is int:",
                     f"    {v} = float({v})",  # OverflowError: the generic path says out_of_range
                     "else:",
                     "    raise DECLINE"]
            out.append(f"{{{t}E{i}}}{{{v}!r}}")
        elif typ == "bool":
            body += ["if tp is not bool:",
                     "    raise DECLINE",
                     f"{v} = 'true' if {v} else 'false'"]
            out.append(f"{{{t}E{i}}}{{{v}}}")
        else:
            body += [f"if tp is not str or len({v}) > 65536:",
                     "    raise DECLINE",
                     f"{v} = esc({v})"]  # Rejected (a newline): the generic path says invalid_char
            out.append(f"{{{t}E{i}}}{{{v}}}")
    body.append(f"line = f'{{prefix}} {','.join(out)} {{ts}}'.encode()")
    return body, ns


_FAST_GLOBALS: dict[str, Any] = {"MISSING": _MISSING, "DECLINE": _DECLINE, "Decline": Decline, "lookup": _lookup,
                                "time_from": _time_from, "esc": escape_string_value, "WS": _WS,
                                "IMIN": INT64_MIN, "IMAX": INT64_MAX, "TSMAX": TS_MAX_NS}


def _compile_json_fast(dec: "JsonDecoder") -> Callable[[bytes, int, str], bytes | None] | None:
    """``fast(payload, received_ns, prefix) -> line | None`` (None: ask the generic decoder)."""
    src = json_fast_source(dec)
    if src is None:
        return None
    body, ns = src
    ns.update(_FAST_GLOBALS)
    code = ["def fast(payload, received_ns, prefix):", "    try:"]
    code += ["        " + line for line in body]
    code += ["        return line", "    except Exception:", "        return None"]
    exec(compile("\n".join(code), f"<iotplat json fast path: {dec.subscription.name}>", "exec"), ns)
    fast: Callable[[bytes, int, str], bytes | None] = ns["fast"]
    return fast


# ---------------------------------------------------------------------------------------------

_PRECISIONS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


class LineProtocolDecoder(Decoder):
    """InfluxDB line protocol, passed through after checks.

    Each line is parsed (measurement, tags, fields, optional timestamp) so a malformed or non-finite
    line becomes a dead letter instead of an InfluxDB 400. The topic's named levels and the
    subscription's tags are added (they win over tags of the same name in the line). A line without a
    timestamp gets the receive time. Options: ``precision`` of the timestamps in the payload
    (``ns`` default, ``us``, ``ms``, ``s``).
    """

    def __init__(self, subscription: Subscription, limits: LimitsConfig) -> None:
        super().__init__(subscription, limits)
        self.check_options({"precision": str})
        prec = self.options.get("precision", "ns")
        if prec not in _PRECISIONS:
            raise ValueError(f"option 'precision' must be one of ns, us, ms, s; got {prec!r}")
        self.factor = _PRECISIONS[prec]
        self.max_fields = limits.max_fields

    def decode(self, payload: bytes, tags: dict[str, str], received_ns: int) -> list[Point | bytes]:
        text = _decode_utf8(payload)
        if "\0" in text:
            raise Rejected(Reason.INVALID_CHAR, "NUL in line protocol")
        out: list[Point | bytes] = []
        nfields = 0
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.strip(" \t\r")
            if not line or line.startswith("#"):
                continue
            meas, ltags, fields, ts = _parse_line(line, lineno)
            nfields += len(fields)
            if nfields > self.max_fields:
                raise Rejected(Reason.TOO_COMPLEX, f"more than {self.max_fields} fields")
            if ts is None:
                ts = received_ns
            else:
                ts *= self.factor
                if ts < TS_MIN_NS or ts > TS_MAX_NS:
                    raise Rejected(Reason.BAD_TIMESTAMP, f"line {lineno}: timestamp out of range")
            ltags.update(tags)
            out.append(Point(meas, ltags, fields, ts))
        if not out:
            raise Rejected(Reason.EMPTY_PAYLOAD, "no lines")
        return out


def _split_unescaped(s: str, sep: str, lineno: int, quotes: bool = False) -> list[str]:
    parts, cur, i, inq = [], [], 0, False
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if quotes and c == '"':
            inq = not inq
        elif c == sep and not inq:
            parts.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    if inq:
        raise Rejected(Reason.INVALID_LINE, f"line {lineno}: unterminated string")
    parts.append("".join(cur))
    return parts


def _unescape(s: str) -> str:
    return re.sub(r"\\([,= \\\"])", r"\1", s)


_INT_RE = re.compile(r"^-?\d+[iu]$")
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _parse_line(line: str, lineno: int) -> tuple[str, dict[str, str], dict[str, Any], int | None]:
    sections = _split_unescaped(line, " ", lineno, quotes=True)
    sections = [s for s in sections if s != ""]
    if len(sections) not in (2, 3):
        raise Rejected(Reason.INVALID_LINE, f"line {lineno}: expected 'measurement[,tags] fields [time]'")
    head = _split_unescaped(sections[0], ",", lineno)
    meas = _unescape(head[0])
    if not meas:
        raise Rejected(Reason.INVALID_LINE, f"line {lineno}: missing measurement")
    tags: dict[str, str] = {}
    for kv in head[1:]:
        kvp = _split_unescaped(kv, "=", lineno)
        if len(kvp) != 2 or not kvp[0] or not kvp[1]:
            raise Rejected(Reason.INVALID_LINE, f"line {lineno}: bad tag {kv[:40]!r}")
        tags[_unescape(kvp[0])] = _unescape(kvp[1])
    fields: dict[str, Any] = {}
    for kv in _split_unescaped(sections[1], ",", lineno, quotes=True):
        kvp = _split_unescaped(kv, "=", lineno, quotes=True)
        if len(kvp) != 2 or not kvp[0] or not kvp[1]:
            raise Rejected(Reason.INVALID_LINE, f"line {lineno}: bad field {kv[:40]!r}")
        name, raw = _unescape(kvp[0]), kvp[1]
        fields[name] = _field_value(raw, name, lineno)
    ts = None
    if len(sections) == 3:
        if not re.fullmatch(r"-?\d{1,19}", sections[2]):
            raise Rejected(Reason.BAD_TIMESTAMP, f"line {lineno}: timestamp must be an integer")
        ts = int(sections[2])
    return meas, tags, fields, ts


def _field_value(raw: str, name: str, lineno: int) -> Any:
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise Rejected(Reason.INVALID_LINE, f"line {lineno}: bad string for {name!r}")
        return re.sub(r'\\(["\\])', r"\1", raw[1:-1])
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    if _INT_RE.match(raw):
        v = int(raw[:-1])
        if v < INT64_MIN or v > INT64_MAX or (raw[-1] == "u" and v < 0):
            raise Rejected(Reason.OUT_OF_RANGE, f"line {lineno}: {name!r} does not fit in 64 bits")
        return v
    if _FLOAT_RE.match(raw):
        v = float(raw)
        if not math.isfinite(v):
            raise Rejected(Reason.NON_FINITE, f"line {lineno}: {name!r} is not finite")
        return v
    low = raw.lower().lstrip("+-")
    if low in ("nan", "inf", "infinity"):
        raise Rejected(Reason.NON_FINITE, f"line {lineno}: {name!r} is not finite")
    raise Rejected(Reason.INVALID_LINE, f"line {lineno}: bad value for {name!r}")


# ---------------------------------------------------------------------------------------------

class RawDecoder(Decoder):
    """A bare value (``21.5``, ``42``, ``true``, text) as one field.

    The field is the single declared ``[subscriptions.fields.X]`` (its name and type), else ``value``
    as a float. The timestamp is the receive time (a raw payload carries none).
    """

    def __init__(self, subscription: Subscription, limits: LimitsConfig) -> None:
        super().__init__(subscription, limits)
        self.check_options({})
        if len(subscription.fields) > 1:
            raise ValueError("format 'raw' takes at most one declared field")
        f = next(iter(subscription.fields.values()), None)
        self.name = f.name if f else "value"
        self.type = f.type if f else "float"
        self.key_eq = escape_key(self.name, "field key") + "="
        self.prefixes = _PrefixCache(subscription.measurement)

    def decode(self, payload: bytes, tags: dict[str, str], received_ns: int) -> list[Point | bytes]:
        text = _decode_utf8(payload)
        s = text.strip()
        if not s:
            raise Rejected(Reason.EMPTY_PAYLOAD, "payload is only whitespace")
        value: Any
        if self.type == "string":
            value = _coerce(s, "string", self.name)
        elif self.type == "bool":
            low = s.lower()
            if low in ("true", "1", "on"):
                value = True
            elif low in ("false", "0", "off"):
                value = False
            else:
                raise Rejected(Reason.TYPE_MISMATCH, f"{self.name!r} must be true or false")
        else:
            if len(s) > 400:
                raise Rejected(Reason.OUT_OF_RANGE, "numeric text longer than 400 characters")
            low = s.lower().lstrip("+-")
            if low in ("nan", "inf", "infinity"):
                raise Rejected(Reason.NON_FINITE, f"{self.name!r} is not finite")
            try:
                num: Any = int(s) if re.fullmatch(r"[-+]?\d+", s) else float(s)
            except ValueError:
                raise Rejected(Reason.TYPE_MISMATCH, f"{self.name!r} must be a number") from None
            value = _coerce(num, self.type, self.name)
        return [f"{self.prefixes.get(tags)} {self.key_eq}{_fmt(value, self.name)} {received_ns}".encode()]


# ---------------------------------------------------------------------------------------------

def available_decoders() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_decoder_class(name: str) -> Callable[..., Any]:
    """The decoder class registered under ``name``. Raises LookupError naming what is available."""
    eps = available_decoders()
    ep = eps.get(name)
    if ep is None:
        raise LookupError(f"no decoder {name!r} is installed (entry point group {ENTRY_POINT_GROUP!r}; "
                          f"installed: {', '.join(sorted(eps)) or 'none'})")
    try:
        return ep.load()
    except Exception as e:  # a broken plugin must be a config-level error, not a traceback
        raise LookupError(f"decoder {name!r} ({ep.value}) failed to import: {type(e).__name__}: {e}") from None


def build_decoders(cfg: WorkerConfig) -> dict[str, Decoder]:
    """Each subscription's decoder, by subscription name. The worker's start and ``--check`` both build them here,
    so ``--check`` fails exactly where the start would: a decoder that is not installed, or that refuses its
    subscription (ValueError, TypeError, KeyError from its constructor), is a ConfigError naming the key."""
    decoders: dict[str, Decoder] = {}
    for i, sub in enumerate(cfg.subscriptions):
        try:
            cls = load_decoder_class(sub.format)
        except LookupError as e:
            raise ConfigError(cfg.path, f"subscriptions[{i}].format", str(e)) from None
        try:
            decoders[sub.name] = cls(sub, cfg.limits)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(cfg.path, f"subscriptions[{i}].options", f"{sub.format}: {e}") from None
    return decoders


def now_ns() -> int:
    return time.time_ns()
