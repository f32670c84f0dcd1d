"""Turn pydantic's validation errors into one-line Problems at the right YAML position.

pydantic reports `loc` tuples and robotic messages; users need `file:line:col: dotted.path: what is
wrong (how to fix it)`. Allowed keys for "did you mean" come from the published JSON Schema, so the
hint and the editor's completion always agree.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from iotplat.errors import Problem
from iotplat.spec import model as m
from iotplat.spec.yamlio import Document, PathT, dotted

_PATTERN_TEXT = {
    m.DNS_LABEL_RE: "must be a DNS label: lowercase letters, digits and '-', starting with a letter, at most 32 characters",
    m.TOPIC_TEMPLATE_RE: "must be an MQTT topic without wildcards (+ #), not starting with $, "
    "with optional {name} levels, e.g. devices/{device}/telemetry; no spaces, control characters or %",
    m.MEASUREMENT_RE: "must start with a letter or _ and hold only letters, digits, _ . -",
    m.DEVICE_ID_PATTERN: "is not valid: use 1-64 letters, digits, _ or -",
    m.INFLUX_NAME_RE: "is not valid: use 1-64 letters, digits, _ or -",
    m.full(m.ENV_VAR): "must be an environment variable name (A-Z, 0-9, _)",
    m.full(r"[a-z][a-z0-9_-]{0,31}"): "is not valid: use lowercase letters, digits, _ or -, starting with a letter",
    m.full(r"[a-z][a-z0-9_-]{2,31}"): "is not valid: use 3-32 lowercase letters, digits, _ or -, starting with a letter",
    m.DNS_NAME_RE: "must be a DNS name: lowercase ASCII letters, digits, '-' and '.' (write an internationalised "
    "name in its xn-- form)",
    m.DOMAIN_RE: "must be a DNS domain of two or more labels: lowercase ASCII letters, digits, '-' and '.'",
    m.DEB_VERSION_RE: "must be a Debian package version, e.g. 2.0.11-1.2+deb12u2 (digits first; letters, digits "
    "and . + ~ - :)",
    m.CONTROLLER_PATH_RE: "must be a path without control characters or { }",
    m.ONE_LINE_RE: "must be one line of at most 256 printable characters (no control characters)",
    m.KEY_RE: "must be 1-128 printable characters on one line (no control characters)",
    m.ATTRIBUTE_NAME_PATTERN: "must be an attribute name: lowercase letters, digits and _, starting with a letter or _",
    m.ATTRIBUTE_VALUE_PATTERN: "is not valid: use 1-64 letters, digits, _ . : or -; it becomes a topic level and a tag",
    m.POSIX_USER_RE: "must be a user name: lowercase letters, digits, _ and -, starting with a letter or _",
    m.MACHINE_SIZE_RE: "must be a machine size name: letters, digits, . _ and -",
    m.full(m.MIRROR_URL): "must be an http:// or https:// URL: a host name, an optional port and a path of letters, "
    "digits and . _ ~ % + / -",
    m.full(r"[a-z0-9-]{1,32}"): "must be an AWS region name, e.g. eu-west-1",
    m.full(r"[a-z0-9]{1,32}"): "must be an Azure location name, e.g. westeurope",
    m.full(r"[A-Za-z0-9*:.,/~ -]{1,64}"): "must be a systemd calendar expression of at most 64 letters, digits, "
    "spaces and * : . , / ~ -",
    m.full(r"/[A-Za-z0-9._/-]{1,255}"): "must be an absolute path of letters, digits and . _ / -",
}

_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    from iotplat.spec.schema import json_schema  # the published schema (maps as additionalProperties)

    return json_schema()


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = _schema()["$defs"][node["$ref"].split("/")[-1]]
    return node


def _variants(node: dict[str, Any]) -> list[dict[str, Any]]:
    node = _resolve(node)
    for key in ("anyOf", "oneOf"):
        if key in node:
            out: list[dict[str, Any]] = []
            for v in node[key]:
                out.extend(_variants(v))
            return out
    return [node]


def allowed_keys(path: PathT, data: Any) -> list[str]:
    """Keys the schema allows in the mapping at `path` (data picks discriminated variants)."""
    nodes = [_schema()]
    cur = data
    for part in path:
        nxt: list[dict[str, Any]] = []
        for node in nodes:
            for v in _variants(node):
                if isinstance(part, int) and "items" in v:
                    nxt.append(v["items"])
                elif isinstance(part, str):
                    props = v.get("properties", {})
                    if part in props:
                        nxt.append(props[part])
                    elif isinstance(v.get("additionalProperties"), dict):
                        nxt.append(v["additionalProperties"])
        cur = cur[part] if isinstance(cur, (dict, list)) and _has(cur, part) else None
        nodes = nxt
    keys: set[str] = set()
    for node in nodes:
        for v in _variants(node):
            props = v.get("properties")
            if not props:
                continue
            kind = props.get("kind", {}).get("const")
            if kind is not None and isinstance(cur, dict) and cur.get("kind") not in (None, kind):
                continue
            keys.update(props)
    return sorted(keys)


def _has(container: Any, part: Any) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(part, int) and 0 <= part < len(container)


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    if options and len(options) <= 16:
        return "allowed: " + ", ".join(options)
    return ""


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[PathT, bool]:
    """Drop pydantic's discriminator/function tags from a loc; return (path, is_key_error)."""
    path: list[str | int] = []
    cur = data
    is_key = False
    for part in loc:
        if part == "[key]":
            is_key = True
            continue
        if isinstance(part, str) and (part.startswith("function-") or part in ("union", "json-or-python")):
            continue
        if isinstance(part, str) and _BRANCH.fullmatch(part) and not (isinstance(cur, dict) and part in cur):
            continue  # a branch of a plain union (str | dict[...]): pydantic's label, not a key of the document
        if isinstance(cur, dict) and isinstance(part, str) and part not in cur and path and path[-1] == "target":
            # discriminated union tag (target.<kind>.*): not a real key in the document
            if cur.get("kind") == part:
                continue
        path.append(part)
        cur = cur[part] if isinstance(cur, (dict, list)) and _has(cur, part) else None
    return tuple(path), is_key


# pydantic's labels of plain (not discriminated) union branches: `constrained-str`, `str`, `dict[...]`, ...
_BRANCH = re.compile(r"(?:constrained-)?(?:str|int|float|bool|none|list|dict|tuple|set)(?:\[.*\])?")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def problems_from(exc: ValidationError, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    kinds: list[str] = []
    for err in exc.errors(include_url=False):
        path, is_key = _clean_loc(tuple(err["loc"]), doc.data)
        etype = err["type"]
        ctx = err.get("ctx") or {}
        value = err.get("input")
        hint = ""
        key_pos = False
        if etype == "extra_forbidden":
            key = str(path[-1])
            message = f"unknown key {key!r}"
            hint = did_you_mean(key, allowed_keys(path[:-1], doc.data))
            key_pos = True
        elif etype == "missing":
            message = f"missing required key {str(path[-1])!r}"
            out.append(Problem(doc.file, *doc.where(path[:-1]), dotted(path), message, hint))
            kinds.append(etype)
            continue
        elif etype in _TYPE_NAMES:
            message = f"expected {_TYPE_NAMES[etype]}, got {_typename(value)} {_describe(value)}"
            if isinstance(value, str) and etype in ("int_type", "float_type") and value.strip().lstrip("-").replace(".", "", 1).isdigit():
                hint = "remove the quotes"
            elif isinstance(value, str) and etype == "bool_type" and value.lower() in ("yes", "no", "on", "off", "y", "n"):
                hint = "write true or false"
        elif etype == "literal_error":
            expected = ctx.get("expected", "")
            message = f"must be one of {expected} (got {_describe(value)})"
            options = [o.strip().strip("'") for o in str(expected).replace(" or ", ", ").split(",")]
            if isinstance(value, str):
                hint = did_you_mean(value, [o for o in options if o])
                if hint.startswith("allowed"):
                    hint = ""
            if path[-2:] == ("auth", "method") and value == "x509":
                hint = "X.509 client certificates are planned; use password, one random credential per device"
        elif etype == "union_tag_invalid":
            message = f"kind must be one of {ctx.get('expected_tags', '')} (got {_describe(ctx.get('tag'))})"
            path = path + ("kind",)
            hint = did_you_mean(str(ctx.get("tag")), [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")])
            if hint.startswith("allowed"):
                hint = ""
        elif etype == "union_tag_not_found":
            message = "missing required key 'kind'"
            out.append(Problem(doc.file, *doc.where(path), dotted(path + ("kind",)), message,
                               "one of local, baremetal, aws, azure"))
            kinds.append(etype)
            continue
        elif etype == "string_pattern_mismatch":
            pattern = ctx.get("pattern", "")
            message = f"{_describe(value)} " + _PATTERN_TEXT.get(pattern, f"must match {pattern}")
        elif etype in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[etype]
            bound = next(iter(ctx.values()), "")
            message = f"must be {op} {bound} (got {_describe(value)})"
        elif etype in ("too_short", "too_long"):
            if isinstance(value, str):
                message = f"{_describe(value)} is too {'short' if etype == 'too_short' else 'long'}"
            elif etype == "too_short":
                message = f"needs at least {ctx.get('min_length')} item(s)"
            else:
                message = f"allows at most {ctx.get('max_length')} item(s)"
        elif etype == "string_too_short":
            message = "must not be empty"
        elif etype == "string_too_long":
            message = f"is longer than {ctx.get('max_length')} characters"
        elif etype == "finite_number":
            message = "must be a finite number (not .nan or .inf)"
        elif etype == "value_error":
            message = str(ctx.get("error") or err["msg"]).removeprefix("Value error, ")
        else:
            message = err["msg"]
        line, col = doc.where(path, key=key_pos or is_key)
        out.append(Problem(doc.file, line, col, dotted(path), message, hint))
        kinds.append(etype)
    return _one_per_union(out, kinds)


def _one_per_union(problems: list[Problem], kinds: list[str]) -> list[Problem]:
    """A value that fails every branch of a union gets one error per branch at the same path; keep the branch whose
    type matches the value (the others only say "expected a mapping"), or, when none does, say all types at once."""
    by_path: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        by_path.setdefault(p.path, []).append(i)
    drop: set[int] = set()
    for path, idx in by_path.items():
        nested = any(q.startswith((f"{path}.", f"{path}[")) and kinds[j] not in _TYPE_NAMES
                     for j, q in enumerate(p.path for p in problems))
        if nested:  # the mapping branch found the real problem inside: the string branch's complaint is noise
            drop.update(i for i in idx if kinds[i] in _TYPE_NAMES)
            continue
        if len(idx) < 2:
            continue
        typed = [i for i in idx if kinds[i] in _TYPE_NAMES]
        if len(typed) < len(idx):
            drop.update(typed)
        else:  # every branch refused the value's type: one line naming them all
            names = sorted({_TYPE_NAMES[kinds[i]] for i in idx})
            first = problems[idx[0]]
            got = first.message.split(", got ", 1)[-1]
            problems[idx[0]] = Problem(first.file, first.line, first.column, path,
                                       f"expected {' or '.join(names)}, got {got}", first.hint)
            drop.update(idx[1:])
    return [p for i, p in enumerate(problems) if i not in drop]


def _typename(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)

