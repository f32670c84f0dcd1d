"""Durations and sizes as people write them in a spec: `200ms`, `10s`, `5m`, `7d`; `256KiB`, `1GiB`."""

from __future__ import annotations

import re

_DURATION_BODY = r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)\s*"
_DURATION = re.compile(rf"\A(?:{_DURATION_BODY})\Z")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_BODY = r"\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KiB|MiB|GiB|TiB|kB|KB|MB|GB|TB)\s*"
_SIZE = re.compile(rf"\A(?:{_SIZE_BODY})\Z")
_SIZE_FACTORS = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}

# Full-string patterns in the dialect of iotplat.spec.model.full (\A...\z; schema.py publishes ^(?:...)$).
DURATION_PATTERN = rf"\A(?:{_DURATION_BODY})\z"
SIZE_PATTERN = rf"\A(?:{_SIZE_BODY})\z"


def parse_duration(value: object) -> float:
    """Seconds from `10s`/`5m`/... or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 10s, 5m, 1h or 7d, not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_FACTORS[m.group(2)]
        raise ValueError(f"{value!r} is not a duration; write a number and a unit: 200ms, 10s, 5m, 1h, 7d or 2w")
    raise ValueError("expected a duration like 10s, 5m, 1h or 7d")


def parse_size(value: object) -> int:
    """Bytes from `256KiB`/`1GiB`/... or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 256KiB or 1GiB, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_FACTORS[m.group(2)])
        raise ValueError(f"{value!r} is not a size; write a number and a unit: 512B, 256KiB, 16MiB or 1GiB")
    raise ValueError("expected a size like 256KiB or 1GiB")


def format_duration(seconds: float) -> str:
    for unit, factor in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{int(round(seconds * 1000))}ms"


def format_size(n: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            if n % factor == 0:
                return f"{n // factor}{unit}"
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"
