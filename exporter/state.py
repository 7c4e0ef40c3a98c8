"""What the app holds for its lifetime, reachable from every request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.audit import Audit
from exporter.catalog import Catalog
from exporter.config import Settings


@dataclass
class State:
    settings: Settings
    engine: AsyncEngine
    catalog: Catalog
    audit: Audit


def get_state(request: Request) -> State:
    s: State = request.app.state.exporter
    return s
