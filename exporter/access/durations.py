"""Durations as people type them: 90s, 15m, 12h, 30d, 2w."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d{1,9})([smhdw])")


def parse_duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match[1]) == 0:
        raise ValueError(f"bad duration {text!r}: a whole number and s, m, h, d or w, e.g. 15m")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])
