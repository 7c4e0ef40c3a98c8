"""What routes take as parameters: the app's state, the request's principal, and its
client as services see it (`ClientDep`).

`async def route(st: StateDep, principal: PrincipalDep)` reads better than fetching both
by hand in every route, and FastAPI resolves each once per request (a route that also
names `AdminDep` authenticates once). Routes hand services the parts of the state they
use, never `State` whole.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from exporter.access.authenticate import authenticate
from exporter.access.principal import Principal
from exporter.state import State, get_state
from exporter.streaming import Client


async def _state(request: Request) -> State:
    # A coroutine, as every dependency here: FastAPI runs a plain function in a worker
    # thread, a hand-over and back for each request (a tenth of a file request's CPU).
    return get_state(request)


StateDep = Annotated[State, Depends(_state)]


async def principal_of(request: Request, st: State) -> Principal:
    return await authenticate(request, st.tokens, st.links, st.settings)


async def _principal(request: Request, st: StateDep) -> Principal:
    return await principal_of(request, st)


PrincipalDep = Annotated[Principal, Depends(_principal)]


async def require_admin(principal: PrincipalDep) -> Principal:
    """The principal of a request that must come from an admin; 401/403 otherwise."""
    if not principal.is_admin:
        raise principal.denied()
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def client_of(request: Request) -> Client:
    return Client(request.client.host if request.client else None, request.receive,
                  request.scope.setdefault("state", {}),
                  tuple(request.query_params.multi_items()))


async def _client(request: Request) -> Client:
    return client_of(request)


ClientDep = Annotated[Client, Depends(_client)]
