"""What the exports feature uses of the app's state, as one record (`Exports`) that the
routes hand to the service (exports/deps.py's `ExportsDep`), and what it asks of the
stored exports above it, which it may not import (`StoredStarts`, `Started`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.limits import Limiter
from exporter.access.links import LinkKeys
from exporter.audit import Audit
from exporter.config import Settings
from exporter.exports.catalog import Catalog
from exporter.exports.resume_copies import ResumeCopies
from exporter.streaming import Client

if TYPE_CHECKING:
    from exporter.exports.request import ExportRequest


@dataclass(frozen=True)
class Started:
    """A stored export started: 202, and where to watch it (`path`, below the server's
    prefix)."""

    id: str
    url: str
    path: str
    status: str
    retry_after: str


class StoredStarts(Protocol):
    """The stored exports (exporter/stored/), as `Prefer: respond-async` starts one."""

    async def kick_off(self, client: Client, exports: Exports, req: ExportRequest
                       ) -> Started:
        """Checks (400, 507 when the quota is full, 429/503 over the caps), then the
        export runs in the background; ClientLeft if the client left meanwhile."""


@dataclass(frozen=True)
class Exports:
    settings: Settings
    engine: AsyncEngine  # the primary: the audit trail reads it
    catalog: Catalog
    audit: Audit
    limiter: Limiter
    links: LinkKeys  # the key Export-Cursor tokens are signed with derives from it
    replica: AsyncEngine | None = None
    stored: StoredStarts | None = None
    resume_copies: ResumeCopies | None = None  # None: EXPORTER_EXPORTS_RESUME is off

    @property
    def export_engine(self) -> AsyncEngine:
        """Where exports read: the replica if there is one. Nothing written goes there."""
        return self.replica or self.engine
