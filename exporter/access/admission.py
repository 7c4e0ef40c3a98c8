"""One admission for every download that uses the server's scarce things: the principal's
download slot and, for an export (GET, HEAD, a stored export, a resume lookup), one of
the deployment's export slots. `Limiter.acquire` (limits.py) takes them and returns a
`Lease` (limits.py, beside the slots it holds), which the caller gives back: `async with
lease`, `lease.release()`, or, for a request, `admit(client, ...)`, and the middleware
(limits.DownloadLimits) gives it back when the response is over, however it ended. Work
that outlives its request (an export completing its copy after the client left) `keep`s
the lease and releases it itself.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exporter.streaming import Client

if TYPE_CHECKING:
    from exporter.access.limits import Lease, Limiter

_LEASE = "exporter.lease"
OVER_MAX_DURATION = "the export ran longer than EXPORTER_EXPORT_MAX_DURATION"


@dataclass
class ExportWatch:
    """What the middleware needs to cut an export whose client stalls."""

    idle_timeout: float  # 0: never
    deadline: float | None  # loop time; None: never
    cut: Callable[[str], None]  # told why, before the response is cut

    def limit(self, now: float) -> tuple[float, str] | None:
        """How long the next `send` may wait, and why it is cut past that."""
        limits: list[tuple[float, str]] = []
        if self.idle_timeout > 0:
            limits.append((self.idle_timeout,
                           f"the client read nothing for {self.idle_timeout:g} s"))
        if self.deadline is not None:
            limits.append((max(0.0, self.deadline - now), OVER_MAX_DURATION))
        return min(limits) if limits else None


def hold(state: dict[str, Any], lease: Lease) -> Lease:
    """The request whose state is `state` holds `lease` until its response is over (the
    middleware gives it back then). One lease per request."""
    assert _LEASE not in state, "a request is admitted once"
    state[_LEASE] = lease
    return lease


def held(scope: MutableMapping[str, Any]) -> Lease | None:
    """The lease the request of (ASGI) `scope` holds, if any."""
    lease: Lease | None = scope.get("state", {}).get(_LEASE)
    return lease


async def admit(client: Client, limiter: Limiter, key: str, *,
                export: bool = True) -> Lease:
    """The one admission of a download: the slots of principal `key` (and an export slot
    unless `export` is False), held by the client's request until its response ends. 429
    or 503 with Retry-After over a cap; streaming.ClientLeft if the client left while it
    waited. A request already admitted (an export that serves a resume, say) keeps its
    lease."""
    lease: Lease | None = client.state.get(_LEASE)
    if lease is not None:
        return lease
    return hold(client.state, await limiter.acquire(client.receive, key, export=export))
