"""Where the data folders (platform/, templates/, roles/, stacks/) are.

In a wheel they ship inside the package as iotplat/_data/<name>; in a checkout (or an editable
install) they are the top-level folders next to iotplat/.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the folder `name` (platform, templates, roles or stacks)."""
    bundled = _PACKAGE / "_data" / name
    if bundled.is_dir():
        return bundled
    checkout = _PACKAGE.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"iotplat data folder {name!r} is missing from this installation; reinstall iotplat")


def schema_path() -> Path:
    return data_dir("platform") / "platform.schema.json"


def default_spec_path() -> Path:
    return data_dir("platform") / "platform.yaml"
