"""containerd's filter syntax, for the snapshots List call.

containerd's metadata layer finds the snapshot a remote Prepare made with a filter such as

    labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/3/sha256:def"

A filter is a comma-separated list of selectors that must all match; List takes several
filters and returns a snapshot if any of them matches (an empty list matches everything). A
selector is a field path, optionally followed by an operator and a value:

    fieldpath   field ('.' field)*        a field is a name or a double-quoted string
    operator    ==  !=  ~=                 (~= is a regular expression search)
    value       a double-quoted string, or everything up to the next ','

A field path alone tests that the field is present and not empty. Snapshot fields: ``name``,
``parent``, ``kind`` (``view``, ``active``, ``committed``) and ``labels.<key>``.

Caveats:
- only double quotes are understood (containerd also takes /regex/ and backquoted values);
  a filter that uses them raises `SnapshotArgumentError`, as containerd rejects what it
  cannot parse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from workbench.errors import SnapshotArgumentError
from workbench.snapshotter.store import Kind, Snapshot

__all__ = ["Filter", "matches", "parse"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    operator: str | None = None
    value: str = ""

    def test(self, field: Callable[[tuple[str, ...]], str | None]) -> bool:
        actual = field(self.path)
        if self.operator is None:
            return bool(actual)
        if self.operator == "==":
            return actual == self.value
        if self.operator == "!=":
            return actual != self.value
        return actual is not None and re.search(self.value, actual) is not None


Filter = tuple[Selector, ...]


def parse(text: str) -> Filter:
    """One filter (comma-separated selectors); `SnapshotArgumentError` if it does not parse."""
    selectors = []
    position = 0
    while True:
        selector, position = _selector(text, position)
        selectors.append(selector)
        if position == len(text):
            return tuple(selectors)
        if text[position] != ",":
            raise _error(text, position, "expected ',' between selectors")
        position += 1


def matches(snapshot: Snapshot, filters: Iterable[Filter]) -> bool:
    """True if any filter matches `snapshot` (or there are none)."""
    filters = list(filters)
    if not filters:
        return True

    def field(path: tuple[str, ...]) -> str | None:
        return _field(snapshot, path)

    return any(all(selector.test(field) for selector in one) for one in filters)


def _field(snapshot: Snapshot, path: tuple[str, ...]) -> str | None:
    head, rest = path[0], path[1:]
    if head == "name" and not rest:
        return snapshot.name
    if head == "parent" and not rest:
        return snapshot.parent
    if head == "kind" and not rest:
        return Kind(snapshot.kind).name.lower()
    if head == "labels" and len(rest) == 1:
        return snapshot.labels.get(rest[0])
    return None


def _selector(text: str, position: int) -> tuple[Selector, int]:
    path = []
    while True:
        name, position = _field_name(text, position)
        path.append(name)
        if position < len(text) and text[position] == ".":
            position += 1
            continue
        break

    operator = text[position : position + 2]
    if operator not in _OPERATORS:
        return Selector(tuple(path)), position
    position += 2
    value, position = _value(text, position)
    if operator == "~=":
        try:
            re.compile(value)
        except re.error as exc:
            raise _error(text, position, f"bad regular expression {value!r}: {exc}") from exc
    return Selector(tuple(path), operator, value), position


def _field_name(text: str, position: int) -> tuple[str, int]:
    if position < len(text) and text[position] == '"':
        return _quoted(text, position)
    match = _NAME.match(text, position)
    if match is None:
        raise _error(text, position, "expected a field name")
    return match.group(), match.end()


def _value(text: str, position: int) -> tuple[str, int]:
    if position < len(text) and text[position] == '"':
        return _quoted(text, position)
    if position < len(text) and text[position] in "/`":
        raise _error(text, position, "only double-quoted or bare values are supported")
    end = text.find(",", position)
    end = len(text) if end < 0 else end
    return text[position:end], end


def _quoted(text: str, position: int) -> tuple[str, int]:
    # A JSON string is what Go's strconv.Unquote takes for the escapes that matter here.
    end = position + 1
    while end < len(text):
        if text[end] == "\\":
            end += 2
            continue
        if text[end] == '"':
            try:
                return json.loads(text[position : end + 1]), end + 1
            except ValueError as exc:
                raise _error(text, position, f"bad quoted string: {exc}") from exc
        end += 1
    raise _error(text, position, "unterminated quoted string")


def _error(text: str, position: int, rule: str) -> SnapshotArgumentError:
    return SnapshotArgumentError(
        f"filter {text!r} at character {position}: {rule}; see containerd's filter syntax "
        '(e.g. labels."containerd.io/snapshot.ref"==sha256:...,parent==NAME)'
    )
