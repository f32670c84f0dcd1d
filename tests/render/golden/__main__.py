"""`python -m tests.render.golden --regenerate [CASE ...]` or `--check`: see tests/render/golden/__init__.py."""

import sys

from tests.render.golden import main

sys.exit(main())
