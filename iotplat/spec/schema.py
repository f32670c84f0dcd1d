"""The published JSON Schema of the spec, generated from the pydantic models.

platform/platform.schema.json is exactly `json_schema_text()`; tests/spec/test_schema.py fails when
they drift (regenerate with `iotplat schema > platform/platform.schema.json`).
"""

from __future__ import annotations

import json
from typing import Any

from iotplat import API_VERSION
from iotplat.spec.model import PlatformSpec

SCHEMA_ID = "https://iotplat.dev/schema/platform-v1.json"


def json_schema() -> dict[str, Any]:
    schema = PlatformSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["description"] = (
        f"iotplat platform spec ({API_VERSION}): one file describes the broker, devices, ingestion, "
        "InfluxDB, Grafana and where they run. Reference: README.md#spec-reference."
    )
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
