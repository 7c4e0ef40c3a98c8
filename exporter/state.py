"""What the app holds for its lifetime, reachable from every request.

The core owns this record; the features own what goes in it. Their types are imported
for the type checker only, so that the core imports no feature at run time (the import
direction is core <- features <- app; tests/test_layout.py holds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.audit import Audit
from exporter.config import Settings
from exporter.notices import Notices

if TYPE_CHECKING:
    from exporter.access.limits import Limiter
    from exporter.access.links import LinkKeys
    from exporter.access.tokens import TokenStore
    from exporter.exports.catalog import Catalog
    from exporter.exports.responses import ServedCopies
    from exporter.files.stream import ReadBudget
    from exporter.health import Health, StoreHealth
    from exporter.objects import ObjectStore
    from exporter.stored.service import StoredService


@dataclass
class State:
    settings: Settings
    engine: AsyncEngine
    catalog: Catalog
    audit: Audit
    tokens: TokenStore
    links: LinkKeys
    limiter: Limiter
    read_budget: ReadBudget
    health: Health
    # EXPORTER_REPLICA_URL's engine and probe; None without a replica.
    replica: AsyncEngine | None = None
    replica_health: Health | None = None
    # Stored exports (exporter/stored/): how the exports feature, which may not import
    # it, starts one (`Prefer: respond-async`).
    stored: StoredService | None = None
    # The stored copies of streamed exports, for resuming them (exporter/stored/, seen
    # through the exports feature's own interface); None: EXPORTER_EXPORTS_RESUME is off.
    resume_copies: ServedCopies | None = None
    # The object store the files are served from (EXPORTER_FILES_ROOT=s3://...); None:
    # they are in a folder.
    files_store: ObjectStore | None = None
    # What other processes changed (tokens): the caches on the hot path trust
    # themselves only while it listens.
    notices: Notices | None = None
    # Whether the object stores answer (for /healthz); None: no setting names one.
    store_health: StoreHealth | None = None

    @property
    def export_engine(self) -> AsyncEngine:
        """Where exports read: the replica if there is one. Nothing written goes there."""
        return self.replica or self.engine


def get_state(request: Request) -> State:
    s: State = request.app.state.exporter
    return s
