"""What the files feature uses of the app's state, as one record (`Files`) that the
routes hand to the service and the response module (files/deps.py's `FilesDep`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.limits import Limiter
from exporter.audit import Audit
from exporter.config import Settings
from exporter.files.stream import ReadBudget
from exporter.objects import ObjectStore


@dataclass(frozen=True)
class Files:
    settings: Settings
    engine: AsyncEngine  # the digests (files/digests.py)
    audit: Audit
    limiter: Limiter
    read_budget: ReadBudget
    # Where the files are when not in a folder (EXPORTER_FILES_ROOT=s3://...).
    store: ObjectStore | None = None
