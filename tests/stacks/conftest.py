"""Shared setup for the Pulumi stack tests: put the stacks' modules on sys.path (via the harness)."""

import stacks_harness  # noqa: F401  (imported for its sys.path side effect)
