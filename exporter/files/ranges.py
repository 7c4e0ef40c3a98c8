"""Range requests (RFC 9110 §14): parsing `Range: bytes=...` and laying out the 206 body."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")
# No file is this large: longer numbers are read as this, which clamps them the same way,
# without int() on thousands of digits (refused beyond 4300, slow before).
_HUGE = 10**18


def _number(digits: str) -> int:
    digits = digits.lstrip("0")
    return int(digits or "0") if len(digits) < 19 else _HUGE


def _less(a: str, b: str) -> bool:
    """a < b for numbers written in digits, however long."""
    a, b = a.lstrip("0"), b.lstrip("0")
    return (len(a), a) < (len(b), b)


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class Unsatisfiable(Exception):
    """No range in the header overlaps the file: 416 with `Content-Range: bytes */SIZE`."""


def recorded(header: str | None, max_ranges: int) -> str | None:
    """The Range an audit row keeps: the byte ranges as parsed (`bytes=0-99,-500`), never
    the header's own text, which a client could make a spreadsheet formula; None for
    a header that asks for no range."""
    if header is None:
        return None
    unit, eq, specs = header.partition("=")
    items = [item.strip() for item in specs.split(",") if item.strip()]
    if not eq or unit.strip().lower() != "bytes" or not items or len(items) > max_ranges:
        return None
    if any(_SPEC.fullmatch(item) is None for item in items):
        return None
    return ("bytes=" + ",".join(items))[:1000]


def parse_range(header: str, size: int, max_ranges: int) -> list[ByteRange] | None:
    """The ranges to send, merged and in order; None means "send the whole file".

    A header that does not parse, uses another unit, or asks for more than
    `max_ranges` ranges is ignored, as RFC 9110 allows and nginx does.
    """
    unit, eq, specs = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    # Empty list elements are allowed (RFC 9110 §5.6.1).
    items = [item.strip() for item in specs.split(",") if item.strip()]
    if not items or len(items) > max_ranges:
        return None
    wanted: list[tuple[int, int]] = []
    for item in items:
        match = _SPEC.fullmatch(item)
        if match is None:
            return None
        first, last, suffix = match.groups()
        if suffix is not None:
            n = _number(suffix)
            if n > 0 and size > 0:  # a zero-length suffix is never satisfiable
                wanted.append((max(0, size - n), size - 1))
            continue
        start = _number(first)
        end = _number(last) if last else size - 1
        if last and _less(last, first):
            return None  # invalid, which is not the same as unsatisfiable
        if start < size:
            wanted.append((start, min(end, size - 1)))
    if not wanted:
        raise Unsatisfiable
    return merge(wanted)


def merge(wanted: list[tuple[int, int]]) -> list[ByteRange]:
    """Overlapping or touching ranges become one, so no byte is sent twice."""
    merged: list[list[int]] = []
    for start, end in sorted(wanted):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [ByteRange(s, e) for s, e in merged]


@dataclass(frozen=True)
class Part:
    """A piece of a body: literal bytes, or a range of the file."""

    literal: bytes = b""
    range: ByteRange | None = None

    @property
    def length(self) -> int:
        return self.range.length if self.range is not None else len(self.literal)


@dataclass(frozen=True)
class Layout:
    """What a response body is made of, and its headers' share of the work."""

    status: int
    parts: list[Part]
    content_type: str
    content_range: str | None = None

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def whole_file(self) -> bool:
        return self.status == 200


def whole(size: int, content_type: str) -> Layout:
    return Layout(200, [Part(range=ByteRange(0, size - 1))] if size else [], content_type)


def partial(ranges: list[ByteRange], size: int, content_type: str) -> Layout:
    if len(ranges) == 1:
        r = ranges[0]
        return Layout(206, [Part(range=r)], content_type, r.content_range(size))
    boundary = secrets.token_hex(16)
    parts: list[Part] = []
    for i, r in enumerate(ranges):
        head = (f"{'' if i == 0 else chr(13) + chr(10)}--{boundary}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Range: {r.content_range(size)}\r\n\r\n")
        parts.append(Part(literal=head.encode("latin-1")))
        parts.append(Part(range=r))
    parts.append(Part(literal=f"\r\n--{boundary}--\r\n".encode("latin-1")))
    return Layout(206, parts, f"multipart/byteranges; boundary={boundary}")
