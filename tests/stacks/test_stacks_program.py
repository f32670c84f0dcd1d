"""The wiring both programs share (iotplat_stack.program), with a fake host factory, offline."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pulumi
from iotplat_stack import config, plan, program
from stacks_harness import RecordingMocks, load_fixture


def test_build_hosts_names_tags_and_outputs_each_host_in_spec_order() -> None:
    cfg = config.parse(load_fixture("aws-3host"), "aws")
    layout = plan.plan(cfg, private_subnet=True, max_rules_per_direction=60)
    calls: list[tuple[str, str, str, dict[str, str]]] = []

    def make_host(host_name: str, spec: config.Host, placed: plan.HostPlan, tags: dict[str, str]) -> Any:
        calls.append((host_name, spec.name, placed.name, tags))
        public_ip = f"203.0.113.{len(calls)}" if placed.public else None
        data_device = f"/dev/{spec.name}"
        return SimpleNamespace(public_ip=public_ip, private_ip=placed.private_ip, data_device=data_device)

    pulumi.runtime.set_mocks(RecordingMocks(), project="iotplat", stack="demo-production", preview=False)
    result: dict[str, Any] = {}

    @pulumi.runtime.test
    def wire() -> pulumi.Output[Any]:
        return program.build_hosts("demo-production", cfg, layout, make_host).apply(result.update)

    wire()

    names = [h.name for h in cfg.hosts]
    assert [c[0] for c in calls] == [f"demo-production-{n}" for n in names]
    assert [c[1] for c in calls] == [c[2] for c in calls] == names
    for _, host, _, tags in calls:
        assert tags == {**cfg.tags, "iotplat-host": host}
    assert list(result) == names
    for placed in layout.hosts:
        entry = result[placed.name]
        assert entry["privateIp"] == placed.private_ip
        assert (entry["publicIp"] is not None) is placed.public
        assert entry["dataDevice"] == f"/dev/{placed.name}"
