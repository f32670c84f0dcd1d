"""Checkout shim: `python cli.py ...` behaves like the installed `iotplat` command."""
import sys

from iotplat.cli import main

if __name__ == "__main__":
    sys.exit(main())
