"""`python -m tests.support.cloudsim ...` runs the `pulumi` double (the shim on PATH does this)."""

import sys

from .cli import main

sys.exit(main())
