"""Safe YAML loading that remembers where every value came from.

Why not yaml.safe_load: it forgets line numbers, silently keeps the last of two duplicate keys,
reads `on`/`no`/`yes` as booleans (YAML 1.1) and expands alias bombs. We let libyaml *compose* the
node graph (which never runs constructors, so `!!python/...` tags cannot execute anything) and
build plain Python values ourselves:

- scalars resolve like YAML 1.2's core schema: only true/false are booleans, `08` is an int,
  dates stay strings;
- duplicate keys, unknown tags, non-scalar keys, excessive nesting and alias expansion beyond a
  node budget are reported as Problems with their position;
- `positions[path]` is the 1-based (line, column) of each value, `key_positions[path]` that of
  its key, so validation errors can point at the exact spot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from iotplat.errors import InvalidInput, Problem, SpecInvalid

PathT = tuple[str | int, ...]

MAX_DEPTH = 64


class _Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core-schema implicit typing."""


_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"\A(?:true|True|TRUE|false|False|FALSE)\Z"), list("tTfF")
)
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"\A(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z"),
    list("-+0123456789"),
)
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"\A(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"),
    list("-+0123456789."),
)
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"\A(?:~|null|Null|NULL|)\Z"), ["~", "n", "N", ""]
)
_Resolver.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"\A(?:<<)\Z"), ["<"])

if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser as _CParser

    class _Loader(_CParser, _Resolver):  # type: ignore[misc,name-defined]
        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            _Resolver.__init__(self)

else:  # pragma: no cover - PyYAML without libyaml

    class _Loader(  # type: ignore[no-redef]
        yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Resolver
    ):
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            _Resolver.__init__(self)


_T = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_T + "str", _T + "int", _T + "float", _T + "bool", _T + "null"}


@dataclass
class Document:
    """A loaded YAML file: plain data plus the position of every value and key."""

    file: str
    data: Any
    positions: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    # For an environment's merged document: the overlay's path prefix and the positions it supplied.
    overlay: PathT = ()
    overlay_positions: frozenset[tuple[int, int]] = frozenset()

    def where(self, path: PathT, *, key: bool = False) -> tuple[int, int]:
        """Best position for `path`: the key or value itself, else the closest parent."""
        table = self.key_positions if key else self.positions
        p = tuple(path)
        if p in table:
            return table[p]
        while p:
            p = p[:-1]
            if p in self.positions:
                return self.positions[p]
        return (1, 1)

    def problem(self, path: PathT, message: str, hint: str = "", *, key: bool = False, base: PathT = ()) -> Problem:
        line, col = self.where(path, key=key)
        return Problem(self.file, line, col, dotted(tuple(base) + tuple(path)), message, hint)


_PLAIN_KEY = re.compile(r"\A[A-Za-z0-9_$-]+\Z")


def dotted(path: PathT) -> str:
    """broker.listeners[0].port; keys that are not plain words are quoted: fields["a.b"]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += "[" + json.dumps(str(part)) + "]"
    return out


def read_text(path: Path, display: str, max_bytes: int) -> str:
    """Read a user file as UTF-8 text, or raise a one-line error naming it."""
    try:
        if path.is_dir():
            raise InvalidInput(f"{display}: is a directory; give the path of a YAML file")
        size = path.stat().st_size
        if size > max_bytes:
            raise SpecInvalid(
                [Problem(display, 1, 1, "", f"file is {size:,} bytes; the limit is {max_bytes:,}",
                         "split device lists into a CSV registry (devices.registry)")]
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{display}: no such file (create one with `iotplat init`)") from None
    except PermissionError:
        raise InvalidInput(f"{display}: permission denied; check the file's mode and owner") from None
    except OSError as exc:
        raise InvalidInput(f"{display}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecInvalid(
            [Problem(display, line, col, "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                     "save the file as UTF-8")]
        ) from None
    if "\x00" in text:
        pos = text.index("\x00")
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        raise SpecInvalid([Problem(display, line, col, "", "contains a NUL byte; this is not a text file")])
    return text.removeprefix("\ufeff")


def load_yaml_text(text: str, display: str, *, max_nodes: int = 1_000_000, require_mapping: bool = True) -> Document:
    """Parse one YAML document into a Document, or raise SpecInvalid with its position."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = (exc.problem or exc.context or "invalid YAML").strip()
        hint = ""
        lines = text.splitlines()
        if 0 < line <= len(lines) and "\t" in lines[line - 1][: col + 1]:
            hint = "indent with spaces, not tabs"
        elif 0 < line <= len(lines) and "/{" in lines[line - 1] and ("[" in lines[line - 1] or "{" in lines[line - 1].split("/{")[0]):
            hint = "inside [ ] or { } quote topic templates: 'devices/{device}/telemetry'"
        if exc.context and exc.problem:
            message = f"{exc.problem} ({exc.context})"
        raise SpecInvalid([Problem(display, line, col, "", f"YAML syntax error: {message}", hint)]) from None
    except yaml.YAMLError as exc:  # reader errors (control characters) and the like
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise SpecInvalid([Problem(display, line, col, "", f"not readable as YAML: {reason}")]) from None
    except RecursionError:
        raise SpecInvalid([Problem(display, 1, 1, "", f"nested more than {MAX_DEPTH} levels deep")]) from None
    if node is None:
        raise SpecInvalid([Problem(display, 1, 1, "", "the file is empty", "start from `iotplat init`")])
    # Aliases may re-use nodes; allow a generous 10x re-use, which stops alias bombs after a few
    # thousand values instead of after max_nodes.
    budget = min(max_nodes, 10 * _distinct_nodes(node) + 10_000)
    builder = _Builder(display, budget)
    data = builder.build(node)
    if builder.problems:
        raise SpecInvalid(builder.problems)
    doc = Document(display, data, builder.positions, builder.key_positions)
    if require_mapping and not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single value ({type(data).__name__})"
        raise SpecInvalid([doc.problem((), f"the top level must be a mapping of keys, not {kind}",
                                       "see `iotplat init` for the expected layout")])
    return doc


def load_yaml_file(path: Path, display: str, *, max_bytes: int, max_nodes: int = 1_000_000,
                   require_mapping: bool = True) -> Document:
    return load_yaml_text(read_text(path, display, max_bytes), display, max_nodes=max_nodes,
                          require_mapping=require_mapping)


class _Budget(Exception):
    pass


class _Builder:
    """Turns composed nodes into plain values, recording positions and problems."""

    def __init__(self, display: str, max_nodes: int) -> None:
        self.display = display
        self.max_nodes = max_nodes
        self.count = 0
        self.problems: list[Problem] = []
        self.positions: dict[PathT, tuple[int, int]] = {}
        self.key_positions: dict[PathT, tuple[int, int]] = {}

    def _pos(self, node: Node) -> tuple[int, int]:
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def _problem(self, node: Node, path: PathT, message: str, hint: str = "") -> None:
        line, col = self._pos(node)
        self.problems.append(Problem(self.display, line, col, dotted(path), message, hint))

    def build(self, node: Node) -> Any:
        try:
            return self._node(node, (), 0)
        except _Budget:
            return None

    def _node(self, node: Node, path: PathT, depth: int) -> Any:
        self.count += 1
        if self.count > self.max_nodes:
            self._problem(node, path, f"the document expands to more than {self.max_nodes:,} values",
                          "is this a YAML alias bomb? remove the anchors/aliases")
            raise _Budget
        if depth > MAX_DEPTH:
            self._problem(node, path, f"nested more than {MAX_DEPTH} levels deep")
            raise _Budget
        if path not in self.positions:
            self.positions[path] = self._pos(node)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _T + "seq":
                self._problem(node, path, f"unsupported YAML tag {_short(node.tag)!r}",
                              "iotplat specs use plain YAML values only")
                return None
            return [self._node(child, path + (i,), depth + 1) for i, child in enumerate(node.value)]
        if isinstance(node, MappingNode):
            if node.tag != _T + "map":
                self._problem(node, path, f"unsupported YAML tag {_short(node.tag)!r}",
                              "iotplat specs use plain YAML values only")
                return None
            return self._mapping(node, path, depth)
        self._problem(node, path, "unsupported YAML node")  # pragma: no cover
        return None

    def _scalar(self, node: ScalarNode, path: PathT) -> Any:
        tag, value = node.tag, node.value
        if tag not in _PLAIN_TAGS:
            self._problem(node, path, f"unsupported YAML tag {_short(tag)!r}",
                          "iotplat specs use plain YAML values only; remove the tag")
            return None
        if "\x00" in value:
            self._problem(node, path, "contains a NUL character", "remove the \\0 escape")
            return None
        if tag == _T + "str":
            return value
        if tag == _T + "null":
            return None
        if tag == _T + "bool":
            return value.lower() == "true"
        if tag == _T + "int":
            try:
                if value.startswith(("0o", "0x")):
                    return int(value, 0)
                return int(value, 10)
            except ValueError:
                self._problem(node, path, f"{value!r} is not an integer")
                return None
        try:
            return float(value.replace(".inf", "inf").replace(".Inf", "inf").replace(".INF", "inf")
                         .replace(".nan", "nan").replace(".NaN", "nan").replace(".NAN", "nan"))
        except ValueError:
            self._problem(node, path, f"{value!r} is not a number")
            return None

    def _mapping(self, node: MappingNode, path: PathT, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_seen: dict[str, int] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == _T + "merge":
                for source in _merge_sources(value_node):
                    if not isinstance(source, MappingNode):
                        self._problem(value_node, path, "`<<` merges only mappings")
                        continue
                    part = self._mapping(source, path, depth + 1)
                    for k, v in part.items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, ScalarNode):
                self._problem(key_node, path, "a key must be a plain value, not a list or mapping")
                continue
            if key_node.tag not in _PLAIN_TAGS:
                self._problem(key_node, path, f"unsupported YAML tag {_short(key_node.tag)!r} on a key")
                continue
            key = key_node.value
            if "\x00" in key:
                self._problem(key_node, path, "a key contains a NUL character")
                continue
            line = key_node.start_mark.line + 1
            if key in first_seen:
                self._problem(key_node, path + (key,), f"duplicate key {key!r} (first defined on line {first_seen[key]})",
                              "keep one of them")
                continue
            first_seen[key] = line
            self.key_positions[path + (key,)] = self._pos(key_node)
            out[key] = self._node(value_node, path + (key,), depth + 1)
        for k, v in merged.items():
            out.setdefault(k, v)
        return out


def _distinct_nodes(root: Node) -> int:
    seen: set[int] = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, MappingNode):
            for k, v in n.value:
                stack.append(k)
                stack.append(v)
    return len(seen)


def _merge_sources(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    return [node]


def _short(tag: str) -> str:
    return "!!" + tag[len(_T):] if tag.startswith(_T) else tag
