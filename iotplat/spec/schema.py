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


def ecma_pattern(pattern: str) -> str:
    """A model pattern `\\A(?:body)\\z` (Rust's regex dialect, see iotplat.spec.model.full) as JSON Schema's
    ECMA-262 dialect writes it: `^(?:body)$`, where `$` without the m flag is the end of the input."""
    if pattern.startswith("\\A") and pattern.endswith("\\z"):
        return "^" + pattern[2:-2] + "$"
    raise ValueError(f"schema pattern {pattern!r} is not full-string; build it with iotplat.spec.model.full")


def _ecma(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "pattern" and isinstance(v, str):
                out[k] = ecma_pattern(v)
            elif k == "patternProperties" and isinstance(v, dict) and len(v) == 1 and "additionalProperties" not in node:
                # dict[Annotated[str, pattern], V]: every key matches, so say it the direct way (editors then
                # flag a bad key, and readers of the schema see "a map of V")
                (pattern, sub), = v.items()
                out["additionalProperties"] = _ecma(sub)
                out["propertyNames"] = {**node.get("propertyNames", {}), "pattern": ecma_pattern(pattern)}
            elif k == "propertyNames" and "patternProperties" in node:
                continue
            else:
                out[k] = _ecma(v)
        return out
    if isinstance(node, list):
        return [_ecma(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    schema = _ecma(PlatformSpec.model_json_schema())
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["description"] = (
        f"iotplat platform spec ({API_VERSION}): one file describes the broker, devices, ingestion, "
        "InfluxDB, Grafana and where they run. Reference: README.md#spec-reference."
    )
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
