"""iotplat on AWS: read the rendered stack config, plan, build the platform, export addresses.

Run by the deploy step as `pulumi up --stack <platform>-<env> --config-file <file>` from this
directory. Everything but wiring lives in iotplat_aws/ (resources) and ../common (config, plan).
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent / "common"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pulumi  # noqa: E402
from iotplat_aws.firewall import MAX_RULES_PER_DIRECTION  # noqa: E402
from iotplat_aws.platform import Platform, PlatformArgs  # noqa: E402
from iotplat_stack import config, plan  # noqa: E402

cfg = config.from_pulumi("aws")
layout = plan.plan(cfg, private_subnet=True, max_rules_per_direction=MAX_RULES_PER_DIRECTION)
platform = Platform(cfg.name, PlatformArgs(config=cfg, plan=layout))

pulumi.export("hosts", platform.hosts)
pulumi.export("sshUser", cfg.ssh_user)
pulumi.export("sshJumpHost", layout.bastion)
