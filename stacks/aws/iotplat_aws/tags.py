"""Tag helper: every taggable AWS resource carries the platform tags plus a readable Name."""

from __future__ import annotations

from collections.abc import Mapping


def tagged(base: Mapping[str, str], name: str, **extra: str) -> dict[str, str]:
    return {**base, **extra, "Name": name}
