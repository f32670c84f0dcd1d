"""Every target kind the spec accepts has its render side (iotplat/render/targets.py); the golden trees
(tests/render/golden: default/local3 local, baremetal, aws, azure) hold what each renders, byte for byte."""

from __future__ import annotations

import typing

from iotplat.render.targets import TARGETS
from iotplat.spec.model import Target


def test_every_spec_target_kind_has_a_render_target() -> None:
    union = typing.get_args(Target)[0]  # Annotated[A | B | ..., Field(discriminator="kind")]
    kinds = {typing.get_args(cls.model_fields["kind"].annotation)[0] for cls in typing.get_args(union)}
    assert kinds == set(TARGETS) == {"local", "baremetal", "aws", "azure"}
    for kind, target in TARGETS.items():
        assert target.kind == kind
