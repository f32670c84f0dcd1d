"""iotplat on AWS, the Pulumi program: ../common/bootstrap.py runs it with the components in iotplat_aws/."""

import runpy
from pathlib import Path

run_stack = runpy.run_path(str(Path(__file__).resolve().parents[1] / "common" / "bootstrap.py"))["run_stack"]
run_stack("aws", private_subnet=True)  # hosts without a public IP: a private subnet behind a NAT gateway
