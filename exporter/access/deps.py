"""What routes take as parameters: the app's state and the request's principal.

`async def route(st: StateDep, principal: PrincipalDep)` reads better than fetching both
by hand in every route, and FastAPI resolves each once per request (a route that also
names `AdminDep` authenticates once).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from exporter.access.authenticate import authenticate
from exporter.access.principal import Principal
from exporter.state import State, get_state

StateDep = Annotated[State, Depends(get_state)]


async def _principal(request: Request, st: StateDep) -> Principal:
    return await authenticate(request, st)


PrincipalDep = Annotated[Principal, Depends(_principal)]


async def require_admin(principal: PrincipalDep) -> Principal:
    """The principal of a request that must come from an admin; 401/403 otherwise."""
    if not principal.is_admin:
        raise principal.denied()
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
