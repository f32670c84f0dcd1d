"""InfluxDB line protocol: the ``Point`` type decoders return, escaping, and encoding with checks.

Every value is checked here before it is written, so InfluxDB never sees a line it would reject for
a reason we can know in advance (NaN/Inf, an int beyond int64, a newline, an empty key). Problems
raise ``Rejected`` with a reason from the closed ``Reason`` enum.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# InfluxDB's timestamp range (ns since the epoch): 1677-09-21 .. 2262-04-11.
TS_MIN_NS = -9223372036854775806
TS_MAX_NS = 9223372036854775806


class Reason(str, enum.Enum):
    """Why a message became a dead letter. A closed set: dashboards and alerts key on these values."""

    EMPTY_PAYLOAD = "empty_payload"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    INVALID_LINE = "invalid_line"          # malformed line protocol
    TOO_LARGE = "too_large"
    TOO_COMPLEX = "too_complex"
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    TYPE_MISMATCH = "type_mismatch"
    MISSING_FIELD = "missing_field"
    BAD_TIMESTAMP = "bad_timestamp"
    INVALID_CHAR = "invalid_char"          # newline or NUL where line protocol cannot carry it
    NO_MATCHING_TOPIC = "no_matching_topic"
    INFLUX_REJECTED = "influx_rejected"    # InfluxDB answered 400/422 for this line
    DECODER_ERROR = "decoder_error"        # a plugin raised something other than Rejected


class Rejected(Exception):
    """A message (or one point of it) that cannot be stored. The only exception decoders may raise."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = Reason(reason)
        self.detail = detail[:300]
        super().__init__(f"{self.reason.value}: {self.detail}" if detail else self.reason.value)


@dataclass(slots=True)
class Point:
    """One InfluxDB point. ``time_ns`` None means "use the time the worker received the message".

    Field values: ``float``, ``int`` (stored as an InfluxDB integer), ``bool`` or ``str``.
    """

    measurement: str
    tags: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    time_ns: int | None = None


_KEY_TABLE = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_MEAS_TABLE = str.maketrans({",": "\\,", " ": "\\ "})


def _check_text(s: str, what: str) -> None:
    if "\n" in s or "\r" in s or "\0" in s:
        raise Rejected(Reason.INVALID_CHAR, f"{what} contains a newline or NUL")


def escape_key(s: str, what: str = "key") -> str:
    """Escape a tag key, tag value or field key."""
    if not s:
        raise Rejected(Reason.MISSING_FIELD, f"empty {what}")
    _check_text(s, what)
    if s.endswith("\\"):
        raise Rejected(Reason.INVALID_CHAR, f"{what} ends with a backslash")
    return s.translate(_KEY_TABLE)


def escape_measurement(s: str) -> str:
    if not s:
        raise Rejected(Reason.MISSING_FIELD, "empty measurement")
    _check_text(s, "measurement")
    if s.endswith("\\") or s.startswith("#"):
        raise Rejected(Reason.INVALID_CHAR, "measurement ends with a backslash or starts with '#'")
    return s.translate(_MEAS_TABLE)


def escape_string_value(s: str) -> str:
    _check_text(s, "string value")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_value(v: Any, name: str = "value") -> str:
    """Format one field value; raise Rejected for anything InfluxDB would reject."""
    t = type(v)
    if t is float:
        if v != v or v in (math.inf, -math.inf):
            raise Rejected(Reason.NON_FINITE, f"field {name!r} is not finite")
        return repr(v)
    if t is bool:
        return "true" if v else "false"
    if t is int:
        if v < INT64_MIN or v > INT64_MAX:
            raise Rejected(Reason.OUT_OF_RANGE, f"field {name!r} does not fit in int64")
        return f"{v}i"
    if t is str:
        return escape_string_value(v)
    raise Rejected(Reason.TYPE_MISMATCH, f"field {name!r} has unsupported type {t.__name__}")


def tag_prefix(measurement: str, tags: dict[str, str]) -> str:
    """``measurement,tag=v,...`` with tags in key order (InfluxDB's preferred order)."""
    parts = [escape_measurement(measurement)]
    for k in sorted(tags):
        v = tags[k]
        if v == "":
            continue  # line protocol has no empty tag values; an empty tag is no tag
        parts.append(escape_key(k, "tag key") + "=" + escape_key(v, "tag value"))
    return ",".join(parts)


def check_time(ts: int) -> int:
    if ts < TS_MIN_NS or ts > TS_MAX_NS:
        raise Rejected(Reason.BAD_TIMESTAMP, "timestamp outside InfluxDB's range (1677..2262)")
    return ts


def encode_fields(fields: dict[str, Any]) -> str:
    if not fields:
        raise Rejected(Reason.MISSING_FIELD, "point has no fields")
    return ",".join(escape_key(k, "field key") + "=" + format_value(v, k) for k, v in fields.items())


def encode_point(p: Point, default_ns: int) -> bytes:
    """Encode a Point as one line (no trailing newline), timestamp in ns."""
    if not isinstance(p, Point):
        raise Rejected(Reason.DECODER_ERROR, f"decoder returned {type(p).__name__}, not Point")
    if not isinstance(p.measurement, str) or not isinstance(p.tags, dict) or not isinstance(p.fields, dict):
        raise Rejected(Reason.DECODER_ERROR, "malformed Point")
    for k, v in p.tags.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise Rejected(Reason.DECODER_ERROR, "tag keys and values must be strings")
    for k in p.fields:
        if not isinstance(k, str):
            raise Rejected(Reason.DECODER_ERROR, "field keys must be strings")
    ts = default_ns if p.time_ns is None else p.time_ns
    if type(ts) is not int:
        raise Rejected(Reason.BAD_TIMESTAMP, "time_ns must be an int")
    check_time(ts)
    return f"{tag_prefix(p.measurement, p.tags)} {encode_fields(p.fields)} {ts}".encode()


_EXCERPT_TABLE = {i: f"\\x{i:02x}" for i in list(range(0x20)) + [0x7F]}
_EXCERPT_TABLE[ord("\\")] = "\\\\"
_EXCERPT_TABLE.update({0xDC80 + i: f"\\x{0x80 + i:02x}" for i in range(128)})  # undecodable bytes


def excerpt(payload: bytes, limit: int) -> str:
    """A bounded, escaped, printable excerpt of a payload: control characters, backslashes and
    bytes that are not UTF-8 are written as ``\\xNN`` / ``\\\\``; longer payloads end in "..."."""
    text = payload[:limit].decode("utf-8", "surrogateescape").translate(_EXCERPT_TABLE)
    if len(text) > limit:
        text = text[:limit]
    if len(payload) > limit:
        text += "..."
    return text
