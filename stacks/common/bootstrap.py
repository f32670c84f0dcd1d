"""The start of both Pulumi programs. stacks/<cloud>/__main__.py loads this file by its path (nothing of stacks/
is importable before it has run) and calls run_stack with its cloud's name and planning options.

Pulumi runs a program from its folder: the deploy step runs `pulumi up --stack <platform>-<env> --config-file
<file>` in stacks/<cloud> (docs/stacks.md). run_stack puts stacks/<cloud> and stacks/common on sys.path, found
from this file's own place, so a program runs the same from a checkout, from the copy inside the wheel
(iotplat/_data/stacks) and from the deploy step's copy in the state directory (<cloud>/ and common/ side by
side); then it runs iotplat_stack.program.run with the cloud's Platform component
(iotplat_<cloud>.platform.Platform), its firewall's rule quota (iotplat_<cloud>.firewall.MAX_RULES_PER_DIRECTION)
and where its load balancer's health checks come from (iotplat_<cloud>.platform.HEALTH_CHECK_CIDR).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

STACKS = Path(__file__).resolve().parents[1]


def run_stack(cloud: str, *, private_subnet: bool) -> None:
    for path in (STACKS / cloud, STACKS / "common"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from iotplat_stack import program

    platform = importlib.import_module(f"iotplat_{cloud}.platform")
    firewall = importlib.import_module(f"iotplat_{cloud}.firewall")
    program.run(cloud, platform.Platform, private_subnet=private_subnet,
                max_rules_per_direction=firewall.MAX_RULES_PER_DIRECTION,
                health_check_cidr=platform.HEALTH_CHECK_CIDR)
