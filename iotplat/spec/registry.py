"""Editing the device registry: the one module that writes it, keeping the file's own format.

`iotplat.spec.devices` loads a registry (a fast parser for 100,000 rows); this module changes one: it adds a
device or removes one, and replaces the file only after the whole spec validated with the new content.

- **CSV**: rows are found by the header's `id` column (whatever its position), with the loader's rules (blank
  lines and lines whose first cell starts with `#` are not rows). `add` appends one row in the header's column
  order; `remove` deletes exactly the physical lines of the matching record. Every other line is kept byte for
  byte (comments, quoting, CRLF line ends).
- **YAML**: read with ruamel.yaml's round-trip loader (YAML 1.2), which knows where each entry starts. A new
  entry is one flow mapping line (`- {id: x, site: y}`) written by ruamel.yaml; a value is double-quoted when a
  YAML 1.1 reader (PyYAML) or a YAML 1.2 reader would read it as anything but that string (`on`, `yes`, `1.2`,
  `0o17`, `12:30`, `2020-01-01`, ...). Removing an entry deletes its lines as text and keeps the comment lines
  around it: ruamel.yaml 0.19.1's own `del seq[i]` loses or misplaces comments there (measured: with a comment
  line before the next block entry it emitted `- id: lab-3 building: "1.2"`, which is not YAML). A flow-style or
  empty `devices:` list is edited by ruamel.yaml's round trip, which keeps every comment outside the list.
  The registry given to this module has passed iotplat's strict loader (no tags, bounded aliases, size).

`replace_validated` is the file step of a registry change: temp file -> validate the whole spec with it ->
fsync -> rename -> commit (the caller's state) — and if the commit fails the old bytes are put back. A crash at
any point leaves the registry either as it was or as validated, never half written.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iotplat.errors import InvalidInput
from iotplat.spec.devices import ATTRIBUTE_NAME_RE, ATTRIBUTE_VALUE_RE, DEVICE_ID_RE, RESERVED_PREFIX

if TYPE_CHECKING:
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

_STR = "tag:yaml.org,2002:str"
_TEMP_SUFFIX = ".iotplat-new"


# ---------------------------------------------------------------------------- what may be written


def check_device_id(device_id: str) -> None:
    """A device id for `device add`: the registry's own rule, matched on the whole string."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise InvalidInput(f"device id {device_id!r} is not valid: use 1-64 letters, digits, _ or -")
    if device_id.startswith(RESERVED_PREFIX):
        raise InvalidInput(f"device id {device_id!r}: ids starting with {RESERVED_PREFIX!r} are reserved for iotplat's "
                           "own clients")


def check_attributes(attributes: Mapping[str, str]) -> None:
    for name, value in attributes.items():
        if name == "id" or not ATTRIBUTE_NAME_RE.fullmatch(name):
            raise InvalidInput(f"--attr {name!r}: not an attribute name: use 1-32 lowercase letters, digits and _ "
                               "(not `id`), starting with a letter or _")
        if not ATTRIBUTE_VALUE_RE.fullmatch(value):
            raise InvalidInput(f"--attr {name}={value!r}: the value must be 1-64 letters, digits, _ . : or -")


def registry_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise InvalidInput(f"{path}: unknown registry format {suffix or '(no extension)'!r}; use a .csv or .yaml file")


def add_device(path: Path, text: str, device_id: str, attributes: Mapping[str, str]) -> str:
    """The registry's text with one more device (refused when the id is taken or a column is unknown)."""
    check_device_id(device_id)
    check_attributes(attributes)
    if registry_format(path) == "csv":
        return _csv_add(path, text, device_id, attributes)
    return _yaml_add(path, text, device_id, attributes)


def remove_device(path: Path, text: str, device_id: str) -> str:
    """The registry's text without the device whose `id` is device_id (refused when there is none)."""
    if registry_format(path) == "csv":
        return _csv_remove(path, text, device_id)
    return _yaml_remove(path, text, device_id)


# ---------------------------------------------------------------------------- CSV


@dataclass(frozen=True)
class _Record:
    start: int  # index of its first physical line
    end: int  # one past its last physical line
    cells: list[str]


def _csv_lines(text: str) -> list[str]:
    return io.StringIO(text, newline="").readlines()  # the line ends the csv module (and the loader) sees, kept


def _csv_records(path: Path, lines: list[str]) -> tuple[_Record | None, list[_Record]]:
    """(header, rows): records as the loader (iotplat.spec.devices) reads them, with their line spans."""
    reader = csv.reader(iter(lines))
    header: _Record | None = None
    rows: list[_Record] = []
    start = 0
    try:
        for row in reader:
            end = reader.line_num
            record = _Record(start, end, [c.strip() for c in row])
            start = end
            if not row or (len(row) == 1 and not row[0].strip()) or row[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = record
            else:
                rows.append(record)
    except csv.Error as exc:
        raise InvalidInput(f"{path}:{reader.line_num}: CSV error: {exc}") from None
    return header, rows


def _id_column(path: Path, header: _Record | None) -> int:
    if header is None or "id" not in header.cells:
        raise InvalidInput(f"{path}: the header row has no `id` column")
    return header.cells.index("id")


def _newline(lines: list[str]) -> str:
    for line in lines:
        if line.endswith("\r\n"):
            return "\r\n"
        if line.endswith(("\n", "\r")):
            return line[-1]
    return "\n"


def _csv_add(path: Path, text: str, device_id: str, attributes: Mapping[str, str]) -> str:
    lines = _csv_lines(text)
    header, rows = _csv_records(path, lines)
    col = _id_column(path, header)
    assert header is not None
    unknown = sorted(set(attributes) - set(header.cells))
    if unknown:
        raise InvalidInput(f"{path.name}: no column {unknown[0]!r}; columns: {', '.join(header.cells)}")
    if any(len(r.cells) > col and r.cells[col] == device_id for r in rows):
        raise InvalidInput(f"{path.name}: device {device_id!r} is already registered")
    nl = _newline(lines)
    buf = io.StringIO()
    csv.writer(buf, lineterminator=nl).writerow([device_id if c == "id" else attributes.get(c, "") for c in header.cells])
    return text + ("" if not text or text.endswith(("\n", "\r")) else nl) + buf.getvalue()


def _csv_remove(path: Path, text: str, device_id: str) -> str:
    lines = _csv_lines(text)
    header, rows = _csv_records(path, lines)
    col = _id_column(path, header)
    drop = [r for r in rows if len(r.cells) > col and r.cells[col] == device_id]
    if not drop:
        raise InvalidInput(f"{path.name}: no device {device_id!r}")
    gone = {i for r in drop for i in range(r.start, r.end)}
    return "".join(line for i, line in enumerate(lines) if i not in gone)


# ---------------------------------------------------------------------------- YAML


def _ruamel() -> YAML:
    from ruamel.yaml import YAML

    y = YAML(typ="rt")  # YAML 1.2, comments and quotes kept
    y.preserve_quotes = True
    y.width = 4096  # never fold an entry
    return y


def _read_yaml(path: Path, text: str) -> tuple[Any, CommentedSeq]:
    from ruamel.yaml.comments import CommentedSeq
    from ruamel.yaml.error import YAMLError

    try:
        data = _ruamel().load(text)
    except YAMLError as exc:
        raise InvalidInput(f"{path}: cannot read the YAML registry: {str(exc).splitlines()[0]}") from None
    seq = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(seq, CommentedSeq):
        raise InvalidInput(f"{path}: a YAML registry is a mapping with a `devices` list")
    return data, seq


def _changes_type(value: str) -> bool:
    """Would a YAML 1.1 (PyYAML) or YAML 1.2 reader read this plain scalar as anything but a string?"""
    import yaml as pyyaml
    from ruamel.yaml.nodes import ScalarNode
    from ruamel.yaml.resolver import VersionedResolver

    v11 = pyyaml.resolver.Resolver().resolve(pyyaml.nodes.ScalarNode, value, (True, False))
    v12 = VersionedResolver(version=(1, 2)).resolve(ScalarNode, value, (True, False))
    return v11 != _STR or v12 != _STR


def _entry_line(device_id: str, attributes: Mapping[str, str], quote_all: bool = False) -> str:
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    def scalar(v: str) -> str:
        return DoubleQuotedScalarString(v) if quote_all or _changes_type(v) else v

    entry = CommentedMap([("id", scalar(device_id)), *((k, scalar(v)) for k, v in sorted(attributes.items()))])
    entry.fa.set_flow_style()
    buf = io.StringIO()
    _ruamel().dump([entry], buf)
    return buf.getvalue()


def _new_entry(device_id: str, attributes: Mapping[str, str]) -> str:
    """`- {id: ..., name: value}\\n`, checked: a YAML 1.1 reader gets back exactly these strings."""
    import yaml as pyyaml

    want = [{"id": device_id, **attributes}]
    for quote_all in (False, True):
        line = _entry_line(device_id, attributes, quote_all)
        try:
            if pyyaml.safe_load(line) == want:
                return line
        except pyyaml.YAMLError:
            pass
    raise InvalidInput(f"device {device_id!r}: cannot write this entry as YAML that every reader reads alike")


def _dash_line(lines: list[str], line: int, col: int) -> int:
    """The line of the `-` that opens the sequence entry whose node starts at (line, col)."""
    if "-" in lines[line][:col]:
        return line
    for i in range(line - 1, -1, -1):
        stripped = lines[i].strip()
        if stripped == "-" or stripped.startswith(("- #", "-\t#")):
            return i
        if stripped and not stripped.startswith("#"):
            break
    raise InvalidInput(f"cannot find where entry at line {line + 1} starts; edit this registry by hand")


def _is_filler(line: str) -> bool:
    """A line that belongs to no entry: blank, a comment, or the document end marker."""
    s = line.strip()
    return not s or s.startswith("#") or s == "..."


def _spans(lines: list[str], seq: CommentedSeq) -> list[tuple[int, int]]:
    """For each entry: (first line, one past its last line of content); comment and blank lines after an entry
    (before the next one, or at the end of the file) belong to no entry."""
    starts = [_dash_line(lines, *seq.lc.item(i)) for i in range(len(seq))]
    spans = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(lines)
        while end > start + 1 and _is_filler(lines[end - 1]):
            end -= 1
        spans.append((start, end))
    return spans


def _ids(seq: CommentedSeq) -> list[str | None]:
    return [str(item.get("id")) if isinstance(item, dict) and item.get("id") is not None else None for item in seq]


def _round_trip(data: Any, text: str) -> str:
    from ruamel.yaml.util import load_yaml_guess_indent

    y = _ruamel()
    _, indent, offset = load_yaml_guess_indent(text)
    if indent and offset is not None:
        y.indent(mapping=indent, sequence=indent, offset=offset)
    else:
        y.indent(mapping=2, sequence=4, offset=2)
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def _yaml_add(path: Path, text: str, device_id: str, attributes: Mapping[str, str]) -> str:
    data, seq = _read_yaml(path, text)
    if device_id in _ids(seq):
        raise InvalidInput(f"{path.name}: device {device_id!r} is already registered")
    entry = _new_entry(device_id, attributes)
    lines = io.StringIO(text, newline="").readlines()
    nl = _newline(lines)
    if len(seq) == 0 or seq.fa.flow_style():
        from ruamel.yaml.comments import CommentedMap

        new = _ruamel().load(entry)[0]
        seq.append(new if isinstance(new, CommentedMap) else CommentedMap(new))
        seq.fa.set_block_style()
        return _round_trip(data, text).replace("\n", nl)
    start, end = _spans(lines, seq)[-1]
    indent = len(lines[start]) - len(lines[start].lstrip(" "))
    if not lines[end - 1].endswith(("\n", "\r")):
        lines[end - 1] += nl
    lines.insert(end, " " * indent + entry.replace("\n", nl))
    return "".join(lines)


def _yaml_remove(path: Path, text: str, device_id: str) -> str:
    data, seq = _read_yaml(path, text)
    matches = [i for i, dev in enumerate(_ids(seq)) if dev == device_id]
    if not matches:
        raise InvalidInput(f"{path.name}: no device {device_id!r}")
    lines = io.StringIO(text, newline="").readlines()
    if seq.fa.flow_style():
        for i in reversed(matches):
            del seq[i]
        return _round_trip(data, text).replace("\n", _newline(lines))
    spans = _spans(lines, seq)
    gone = {n for i in matches for n in range(*spans[i])}
    return "".join(line for n, line in enumerate(lines) if n not in gone)


# ---------------------------------------------------------------------------- replacing the file


@contextlib.contextmanager
def editing(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the registry's folder while it is edited: two edits of one registry (say from
    two environments, each with its own state lock) cannot interleave. Released when the process exits."""
    fd = os.open(Path(os.path.realpath(path)).parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_temp(dir_fd: int, name: str, data: bytes, like: os.stat_result) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)  # left by an interrupted edit
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 stat.S_IMODE(like.st_mode), dir_fd=dir_fd)
    try:
        if os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, like.st_uid, like.st_gid)
        os.fchmod(fd, stat.S_IMODE(like.st_mode))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_validated(path: Path, data: bytes, check: Callable[[Path], None], commit: Callable[[], None]) -> None:
    """Replace the registry at `path` with `data`, all or nothing.

    1. write `data` to a temp file beside it (same mode and owner) and fsync it;
    2. `check(temp)`: validate the whole spec with it (and prepare the state's change in memory); on failure the
       temp file goes and nothing changed;
    3. rename it over the registry and fsync the folder;
    4. `commit()`: save the state; on failure the old bytes are put back (the same way) and the error raised.

    A symbolic link named as the registry is followed: the file it points to is replaced.
    """
    real = Path(os.path.realpath(path))
    before = real.read_bytes()
    like = os.stat(real)
    tmp = f".{real.stem}{_TEMP_SUFFIX}{real.suffix}"  # the loader reads the format from the suffix
    dir_fd = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _write_temp(dir_fd, tmp, data, like)
        try:
            check(real.parent / tmp)
            os.replace(tmp, real.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
        try:
            commit()
        except BaseException:
            _write_temp(dir_fd, tmp, before, like)
            os.replace(tmp, real.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
            raise
    finally:
        os.close(dir_fd)
