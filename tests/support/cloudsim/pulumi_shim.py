"""Entry point of the `pulumi` shim the tests put on PATH: makes the repository importable, runs the double."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.cloudsim.cli import main  # noqa: E402

sys.exit(main())
