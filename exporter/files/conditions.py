"""Validators (ETag, Last-Modified) and the conditional request headers of RFC 9110 §13."""

from __future__ import annotations

import calendar
import os
import re
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

NOT_MODIFIED, PRECONDITION_FAILED = 304, 412

_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')
# The longest HTTP date form (RFC 850's, with a long weekday) is 33 characters; the room
# above that is for stray spaces. Longer values are not dates, and are not parsed.
MAX_DATE_LENGTH = 64


@dataclass(frozen=True)
class Validators:
    etag: str  # strong, quoted
    last_modified: str  # IMF-fixdate
    mtime: int  # whole seconds, the precision of HTTP dates

    @classmethod
    def of(cls, st: os.stat_result) -> Validators:
        # Size, mtime to the nanosecond and inode: a rewrite, a touch, or a file
        # swapped in by rename each give a new tag.
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"'
        mtime = int(st.st_mtime)
        return cls(etag, formatdate(mtime, usegmt=True), mtime)


def parse_date(value: str | None) -> int | None:
    """Seconds since the epoch of an HTTP date, or None if it is not one (then it is ignored)."""
    if not value or len(value) > MAX_DATE_LENGTH:
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        # OverflowError: a year, day or hour too large for the C integers under datetime.
        return None
    if parsed.tzinfo is None:  # `-0000`: UTC with no claim about local time
        return calendar.timegm(parsed.timetuple())
    return int(parsed.timestamp())


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """(weak, tag) pairs of an If-Match / If-None-Match list; [] means `*`; None if malformed."""
    if value.strip() == "*":
        return []
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(value):
        match = _ETAG.match(value, position)
        if match is None:
            # Reached once, at the end: a copy of the rest at every tag would make a
            # long list cost the square of its length.
            return tags if value[position:].strip() in ("", ",") else None
        tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
    return tags


def _matches(value: str, etags: tuple[str, ...], *, strong: bool) -> bool:
    tags = parse_etags(value)
    if tags is None:
        return False
    if tags == []:
        return True  # `*`: the file exists
    return any(tag in etags and not (strong and weak) for weak, tag in tags)


def evaluate(method: str, headers: dict[str, str], v: Validators,
             variants: tuple[str, ...] = ()) -> int | None:
    """304, 412 or None (go on), in the order of RFC 9110 §13.2.2.

    `variants`: the ETags of the file's other representations (its gzip and zstd
    codings), which If-Match and If-None-Match take as the file's own: the same file
    version, whichever coding a client stored (as Apache does). If-Range does not.
    """
    etags = (v.etag, *variants)
    if_match = headers.get("if-match")
    if if_match is not None:
        if not _matches(if_match, etags, strong=True):
            return PRECONDITION_FAILED
    else:
        since = parse_date(headers.get("if-unmodified-since"))
        if since is not None and v.mtime > since:
            return PRECONDITION_FAILED
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if _matches(if_none_match, etags, strong=False):
            return NOT_MODIFIED if method in ("GET", "HEAD") else PRECONDITION_FAILED
    elif method in ("GET", "HEAD"):
        since = parse_date(headers.get("if-modified-since"))
        if since is not None and v.mtime <= since:
            return NOT_MODIFIED
    return None


def if_range_allows(value: str | None, v: Validators) -> bool:
    """Whether a Range may be honoured: no If-Range, or one naming the current representation.

    An entity tag must match strongly; a date must equal Last-Modified exactly.
    """
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == v.etag
    date = parse_date(value)
    return date is not None and date == v.mtime
