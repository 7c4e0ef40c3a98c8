"""What the /exports routes take beyond access/deps.py's: the stored exports themselves
(`StoredDep`), or the refusal when there are none to see."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from exporter.access.deps import PrincipalDep, StateDep
from exporter.access.principal import ANONYMOUS
from exporter.errors import ApiError
from exporter.stored.service import StoredService


async def stored_of(st: StateDep, principal: PrincipalDep) -> StoredService:
    if principal.kind == ANONYMOUS and not principal.scopes:
        # Nothing public: ask for credentials, whatever the id (so it tells nothing).
        raise principal.denied()
    stored = st.stored
    if not isinstance(stored, StoredService):
        raise ApiError(503, "stored exports are not available")
    return stored


StoredDep = Annotated[StoredService, Depends(stored_of)]
