"""iotplat on Azure: read the rendered stack config, plan, build the platform, export addresses.

Run by the deploy step as `pulumi up --stack <platform>-<env> --config-file <file>` from this
directory. The Azure components live in iotplat_azure/; reading the config, planning and exporting
the outputs is shared code in ../common (iotplat_stack.program.run).
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent / "common"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from iotplat_azure.firewall import MAX_RULES_PER_DIRECTION  # noqa: E402
from iotplat_azure.platform import Platform  # noqa: E402
from iotplat_stack import program  # noqa: E402

# Azure routes the whole virtual network alike, so every host shares one subnet; hosts without
# a public IP reach the internet through the subnet's NAT gateway.
program.run("azure", Platform, private_subnet=False, max_rules_per_direction=MAX_RULES_PER_DIRECTION)
