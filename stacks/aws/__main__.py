"""iotplat on AWS: read the rendered stack config, plan, build the platform, export addresses.

Run by the deploy step as `pulumi up --stack <platform>-<env> --config-file <file>` from this
directory. The AWS components live in iotplat_aws/; reading the config, planning and exporting
the outputs is shared code in ../common (iotplat_stack.program.run).
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent / "common"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from iotplat_aws.firewall import MAX_RULES_PER_DIRECTION  # noqa: E402
from iotplat_aws.platform import Platform  # noqa: E402
from iotplat_stack import program  # noqa: E402

program.run("aws", Platform, private_subnet=True, max_rules_per_direction=MAX_RULES_PER_DIRECTION)
