"""A toy service, as a third party would ship it: this module, one role (roles/toy) and one template folder
(templates/toy), registered under the entry-point group `iotplat.services` (tests/services/test_toy_service.py
writes the dist-info that does so). iotplat itself is not edited to know it.

It renders one file, serves a health endpoint on the host's loopback (a systemd unit), keeps a counter in its
data folder (backed up and restored by its hooks, removed by `destroy --data`) and opens one port to the admins.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from iotplat.services import Ingress, Service, ServiceFile

if TYPE_CHECKING:
    from iotplat.deploy.ops import Context
    from iotplat.hosts import Host
    from iotplat.render.engine import Renderer
    from iotplat.spec.platform_model import Platform

HERE = Path(__file__).resolve().parent.parent
HEALTH_PORT = 18088
COUNTER = "/var/lib/iotplat-toy/counter"


class Toy(Service):
    name: ClassVar[str] = "toy"
    role: ClassVar[str] = "toy"
    title: ClassVar[str] = "Toy"
    deploy_order: ClassVar[int] = 35
    required: ClassVar[bool] = False
    roles_path: ClassVar[Path | None] = HERE / "roles"
    templates_path: ClassVar[Path | None] = HERE / "templates"

    def paths(self) -> Mapping[str, str]:
        return {"toy_conf": "/etc/iotplat-toy/toy.toml", "toy_data": "/var/lib/iotplat-toy"}

    def files(self, r: Renderer) -> list[ServiceFile]:
        return [ServiceFile(self.paths()["toy_conf"], r.template("toy/toy.toml.j2", port=HEALTH_PORT))]

    def ingress(self, p: Platform, host: str) -> list[Ingress]:
        return [Ingress(18089, "admin", "toy status page")]

    def data_dirs(self, p: Platform) -> tuple[str, ...]:
        return (self.paths()["toy_data"],)

    def group_vars(self, p: Platform) -> dict[str, Any]:
        return {"toy_health_port": HEALTH_PORT}

    def units(self, p: Platform, host: str) -> list[str]:
        return ["iotplat-toy.service"]

    def health(self, p: Platform, host: str) -> dict[str, int]:
        return {"toy": HEALTH_PORT}

    def backup(self, ctx: Context, host: Host) -> dict[str, bytes]:
        from iotplat.deploy.backup import run_on

        return {"toy/counter": run_on(host, f"cat {COUNTER}")}

    def restore(self, ctx: Context, host: Host, members: Mapping[str, bytes], info: Mapping[str, Any]) -> None:
        from iotplat.deploy.backup import run_on

        if "toy/counter" in members:
            run_on(host, f"cat > {COUNTER}", stdin=members["toy/counter"])
