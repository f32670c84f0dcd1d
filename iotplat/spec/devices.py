"""The device registry: a CSV or YAML file the spec references, reviewed like code.

CSV: a header row with an `id` column; every other column is an attribute that topic templates
may use (`site/{site}/device/{device}/telemetry`). Lines starting with `#` are comments.
YAML: a mapping with a `devices` list of `{id: ..., <attribute>: ...}` entries.

Parsing is hand-written on top of the csv module because 100,000 rows must load in well under a
second; pydantic per row would dominate render time.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from iotplat.errors import Problem, SpecInvalid
from iotplat.spec.model import ATTRIBUTE_NAME, ATTRIBUTE_VALUE, DEVICE_ID, fullmatch_re
from iotplat.spec.yamlio import load_yaml_text, read_text

# Full-string (\A...\Z): `.match` and `.fullmatch` both refuse "sensor-1\n" (a `$` would accept it).
DEVICE_ID_RE = fullmatch_re(DEVICE_ID)
ATTRIBUTE_NAME_RE = fullmatch_re(ATTRIBUTE_NAME)
ATTRIBUTE_VALUE_RE = fullmatch_re(ATTRIBUTE_VALUE)
RESERVED_PREFIX = "iotplat-"
MAX_REGISTRY_BYTES = 64 * 1024 * 1024
REGISTRY_SUFFIXES = (".csv", ".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    attributes: tuple[tuple[str, str], ...] = ()

    def attr(self, name: str) -> str | None:
        for k, v in self.attributes:
            if k == name:
                return v
        return None


def load_registry(path: Path, display: str) -> tuple[list[Device], list[Problem]]:
    """Load a registry file; returns the devices and every problem found (all at once)."""
    text = read_text(path, display, MAX_REGISTRY_BYTES)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_csv(text, display)
    if suffix in (".yaml", ".yml"):
        return _load_yaml(text, display)
    return [], [Problem(display, 1, 1, "", f"unknown registry format {suffix or '(no extension)'!r}",
                        "use a .csv or .yaml file")]


def _load_csv(text: str, display: str) -> tuple[list[Device], list[Problem]]:
    problems: list[Problem] = []
    devices: list[Device] = []
    rows = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    seen: dict[str, int] = {}
    index = -1
    try:
        for row in rows:
            line = rows.line_num
            if not row or (len(row) == 1 and not row[0].strip()) or row[0].lstrip().startswith("#"):
                continue
            cells = [c.strip() for c in row]
            if header is None:
                header = cells
                if "id" not in header:
                    problems.append(Problem(display, line, 1, "devices", "the header row has no `id` column",
                                            "the first non-comment line names the columns, e.g. id,site"))
                    return [], problems
                for i, name in enumerate(header):
                    if name != "id" and not ATTRIBUTE_NAME_RE.fullmatch(name):
                        problems.append(Problem(display, line, _col(row, i), f"devices.columns[{i}]",
                                                f"column name {name!r} is not a valid attribute name",
                                                "use lowercase letters, digits and _"))
                dup = sorted({n for n in header if header.count(n) > 1})
                if dup:
                    problems.append(Problem(display, line, 1, "devices.columns", f"column {dup[0]!r} appears twice"))
                continue
            index += 1
            if len(cells) != len(header):
                problems.append(Problem(display, line, 1, f"devices[{index}]",
                                        f"row has {len(cells)} cells, the header has {len(header)}"))
                continue
            record = dict(zip(header, cells))
            device = _check_device(record, display, line, index, seen, problems, lambda k: _col(row, header.index(k)))
            if device is not None:
                devices.append(device)
    except csv.Error as exc:
        problems.append(Problem(display, rows.line_num or 1, 1, "devices", f"CSV error: {exc}"))
    if header is None and not problems:
        problems.append(Problem(display, 1, 1, "devices", "the registry is empty", "add a header row: id"))
    return devices, problems


def _col(row: list[str], i: int) -> int:
    # 1-based column of cell i (exact for unquoted cells, which registries normally are)
    return sum(len(c) + 1 for c in row[:i]) + 1


def _load_yaml(text: str, display: str) -> tuple[list[Device], list[Problem]]:
    try:
        doc = load_yaml_text(text, display, max_nodes=5_000_000)
    except SpecInvalid as exc:
        return [], list(exc.problems)
    problems: list[Problem] = []
    extra = sorted(k for k in doc.data if k != "devices")
    for k in extra:
        problems.append(doc.problem((k,), f"unknown key {k!r}", "a YAML registry has one key: devices", key=True))
    items = doc.data.get("devices")
    if not isinstance(items, list):
        problems.append(doc.problem(("devices",), "`devices` must be a list of {id: ...} entries"))
        return [], problems
    devices: list[Device] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        line = doc.where(("devices", index))[0]
        if not isinstance(item, dict):
            problems.append(doc.problem(("devices", index), "each device is a mapping with at least an `id`"))
            continue
        bad = False
        for k, v in item.items():
            if k != "id" and not ATTRIBUTE_NAME_RE.fullmatch(k):
                problems.append(doc.problem(("devices", index, k), f"attribute name {k!r} is not valid",
                                            "use lowercase letters, digits and _", key=True))
                bad = True
            if not isinstance(v, str):
                problems.append(doc.problem(("devices", index, k), f"expected a string, got {type(v).__name__}",
                                            "quote the value"))
                bad = True
        if bad:
            continue
        device = _check_device(item, display, line, index, seen, problems,
                               lambda k, i=index: doc.where(("devices", i, k))[1])
        if device is not None:
            devices.append(device)
    return devices, problems


def _check_device(record: dict[str, str], display: str, line: int, index: int, seen: dict[str, int],
                  problems: list[Problem], col_of) -> Device | None:  # type: ignore[no-untyped-def]
    dev_id = record.get("id", "")
    path = f"devices[{index}]"
    if not DEVICE_ID_RE.fullmatch(dev_id):
        problems.append(Problem(display, line, col_of("id") if "id" in record else 1, f"{path}.id",
                                f"device id {dev_id!r} is not valid",
                                "use 1-64 letters, digits, _ or -; it becomes an MQTT username and a topic level"))
        return None
    if dev_id.startswith(RESERVED_PREFIX):
        problems.append(Problem(display, line, col_of("id"), f"{path}.id",
                                f"device ids starting with {RESERVED_PREFIX!r} are reserved for iotplat's own clients"))
        return None
    if dev_id in seen:
        problems.append(Problem(display, line, col_of("id"), f"{path}.id",
                                f"duplicate device id {dev_id!r} (first on line {seen[dev_id]})"))
        return None
    seen[dev_id] = line
    attrs = []
    for k, v in record.items():
        if k == "id":
            continue
        if v and not ATTRIBUTE_VALUE_RE.fullmatch(v):
            problems.append(Problem(display, line, col_of(k), f"{path}.{k}", f"value {v!r} is not valid",
                                    "use 1-64 letters, digits, _ . : or -; it becomes a topic level and a tag"))
            return None
        attrs.append((k, v))
    return Device(dev_id, tuple(sorted(attrs)))
