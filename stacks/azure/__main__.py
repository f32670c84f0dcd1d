"""iotplat on Azure, the Pulumi program: ../common/bootstrap.py runs it with the components in iotplat_azure/."""

import runpy
from pathlib import Path

run_stack = runpy.run_path(str(Path(__file__).resolve().parents[1] / "common" / "bootstrap.py"))["run_stack"]
# Azure routes the whole virtual network alike, so every host shares one subnet; hosts without
# a public IP reach the internet through the subnet's NAT gateway.
run_stack("azure", private_subnet=False)
