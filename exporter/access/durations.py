"""Durations as people type them: 90s, 15m, 12h, 30d, 2w."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# ASCII digits only: `\d` also takes other scripts' digits, and str.isdigit() takes '²',
# which int() then refuses.
_DURATION = re.compile(r"([0-9]{1,9})([smhdw])")
# Far beyond any token or link lifetime, and far from datetime's limits, so that "now +
# duration" and "now - duration" can never overflow.
LONGEST_DURATION = timedelta(days=100 * 365)


def parse_duration(text: str) -> timedelta:
    """`15m` as a timedelta; ValueError (never another error) for anything else."""
    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match[1]) == 0:
        raise ValueError(f"bad duration {shown}: a whole number and s, m, h, d or w, e.g. 15m")
    seconds = int(match[1]) * _UNITS[match[2]]
    if seconds > LONGEST_DURATION.total_seconds():
        raise ValueError(f"duration {shown} is too long: at most {LONGEST_DURATION.days}d")
    return timedelta(seconds=seconds)
