"""An emulated cloud for iotplat's tests: a `pulumi` test double that runs the real stack programs and
materialises their VMs, networks, disks and firewalls on this machine (see cloud.py and docs/cloudsim.md).

Tests put the double on PATH with `install_shim(bin_dir)` and clean up with `purge(backend_dir)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cloud import leftovers, purge, stack_key

HERE = Path(__file__).resolve().parent

__all__ = ["install_shim", "leftovers", "purge", "stack_key"]


def install_shim(bin_dir: Path, python: str | None = None) -> Path:
    """Write an executable `pulumi` into bin_dir that runs this double with `python` (default: this interpreter)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "pulumi"
    shim.write_text(f"#!/bin/sh\nexec {python or sys.executable} {HERE / 'pulumi_shim.py'} \"$@\"\n")
    shim.chmod(0o755)
    return shim
