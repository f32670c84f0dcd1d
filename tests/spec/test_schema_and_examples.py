"""The published schema, the README reference and the examples stay in step with the code."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from iotplat.spec.load import validate_spec
from iotplat.spec.reference import END, START, reference_markdown
from iotplat.spec.schema import json_schema, json_schema_text
from tests.helpers import EXAMPLES, PLATFORM_DIR, REPO

EXAMPLE_SPECS = sorted(EXAMPLES.glob("*/platform.yaml"))


def test_schema_file_matches_models() -> None:
    assert (PLATFORM_DIR / "platform.schema.json").read_text() == json_schema_text(), (
        "regenerate: iotplat schema > platform/platform.schema.json"
    )


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_readme_reference_is_generated() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == reference_markdown().strip(), "run: python -m iotplat.spec.reference --write"


def test_every_target_has_an_example() -> None:
    kinds = {yaml.safe_load(p.read_text())["target"]["kind"] for p in EXAMPLE_SPECS}
    assert kinds == {"local", "baremetal", "aws", "azure"}
    names = {p.parent.name for p in EXAMPLE_SPECS}
    assert {"device-file", "environments"} <= names


@pytest.mark.parametrize("spec", [PLATFORM_DIR / "platform.yaml", *EXAMPLE_SPECS], ids=lambda p: p.parent.name)
def test_examples_validate_with_iotplat_and_with_the_schema(spec: Path) -> None:
    platforms = validate_spec(spec)
    assert platforms
    data = yaml.safe_load(spec.read_text())
    validator = jsonschema.Draft202012Validator(json_schema())
    errors = [e.message for e in validator.iter_errors(data)]
    assert errors == []
    first = spec.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=") and first.endswith("platform.schema.json")


def test_schema_rejects_what_iotplat_rejects() -> None:
    """Editors validating with the schema flag the same typos the CLI does."""
    data = yaml.safe_load((PLATFORM_DIR / "platform.yaml").read_text())
    data["broker"]["listners"] = data["broker"].pop("listeners")
    validator = jsonschema.Draft202012Validator(json_schema())
    assert any("listners" in e.message for e in validator.iter_errors(data))
    bad = json.loads(json.dumps(data))
    bad["target"] = {"kind": "gcp"}
    assert list(validator.iter_errors(bad))


def test_platform_dir_is_data_only() -> None:
    """A .py or __init__.py in platform/ would shadow the stdlib module `platform`."""
    assert not list(PLATFORM_DIR.rglob("*.py"))
    import platform as stdlib_platform

    assert hasattr(stdlib_platform, "system")
