"""Tokens known in this process, so that a download checks its token without a round
trip: trusted only while `notices.Notices` listens (a trigger on `exporter.tokens`
notifies every change of a token that matters: revoked, deleted, scopes, expiry), and
never longer than a time-to-live, should a notification be lost all the same.

A revoked token or a narrowed scope stops working in every process as soon as the
notification arrives (milliseconds; within a second is the promise, tested with two
processes). Why and how exact: docs/internals.md, section `access/token_cache.py`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from exporter.notices import Notices

CHANNEL = "exporter_tokens"  # migrations/versions/0010: the trigger's channel
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Known:
    """What a lookup found: the principal's parts and until when they hold."""

    value: object
    expires_at: datetime | None  # the token's own expiry
    loaded: float  # monotonic


class TokenCache:
    """Lookups by a key (the secret's hash, or a name) to what the database said."""

    def __init__(self, notices: Notices | None, ttl: float) -> None:
        self._notices = notices
        self._ttl = ttl
        self._entries: OrderedDict[object, Known] = OrderedDict()
        # Bumped by every change heard: a lookup that began before one is not kept.
        self.generation = 0
        if notices is not None:
            notices.on(CHANNEL, lambda _payload: self.forget())
            notices.on_gap(self.forget)

    def forget(self) -> None:
        self.generation += 1
        self._entries.clear()

    def get(self, key: object) -> object | None:
        if self._notices is None or not self._notices.live:
            return None
        known = self._entries.get(key)
        if known is None:
            return None
        if (time.monotonic() - known.loaded >= self._ttl
                or (known.expires_at is not None and known.expires_at <= datetime.now(UTC))):
            del self._entries[key]
            return None
        return known.value

    def put(self, key: object, value: object, expires_at: datetime | None,
            generation: int) -> None:
        """Keep what a lookup begun at `generation` found, unless a change came since."""
        if self._notices is None or generation != self.generation or self._ttl <= 0:
            return
        self._entries[key] = Known(value, expires_at, time.monotonic())
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
