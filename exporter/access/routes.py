"""Access's endpoints: POST /links (a signed, expiring URL for an export or a file) and,
for admins, GET /tokens and DELETE /tokens/{name} (revoke)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from exporter.access import openapi
from exporter.access.authenticate import authenticate, require_admin
from exporter.access.durations import parse_duration
from exporter.access.links import sign, token_identity
from exporter.access.principal import TOKEN, Principal
from exporter.errors import ApiError, bad_parameter
from exporter.server.prefix import strip_root
from exporter.state import get_state

router = APIRouter()

MAX_LIFETIME = parse_duration("30d")


def dataset_names(name: str) -> list[str]:
    """The datasets an export path may name: `orders.csv` is `orders.csv` or `orders`.

    Any suffix is tried, known format or not: this is an early answer only, and the
    export route checks the link's principal again when the link is used.
    """
    base, dot, _ = name.rpartition(".")
    return [name, base] if dot and base else [name]


def may_link(principal: Principal, path: str) -> bool:
    """Whether the principal's scopes cover what `path` serves."""
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        raise bad_parameter("url", "a link's path may not hold . or .. segments")
    if path.startswith("/datasets/"):
        name = unquote(path[len("/datasets/"):])
        return bool(name) and any(principal.may_read_dataset(n) for n in dataset_names(name))
    if path.startswith("/files/"):
        relative = unquote(path[len("/files/"):])
        return principal.may_read_file(relative) or principal.may_list_folder(relative)
    return False


@router.post("/links", openapi_extra=openapi.LINKS)
async def create_link(request: Request) -> JSONResponse:
    st = get_state(request)
    principal = await authenticate(request, st)
    if principal.kind != TOKEN or principal.token_id is None:
        raise principal.denied() if principal.kind == "anonymous" else ApiError(
            403, "links are made with a token"
        )
    try:
        body: Any = await request.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        raise ApiError(
            400, 'expected a JSON body: {"url": "/datasets/...", "expires_in": "15m"}'
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        raise bad_parameter("url", "'url' must be a path such as /datasets/orders.csv?id=gt.5")
    try:
        lifetime = parse_duration(str(body.get("expires_in", "15m")))
    except ValueError as error:
        raise bad_parameter("expires_in", str(error)) from None
    if lifetime > MAX_LIFETIME:
        raise bad_parameter("expires_in", "a link lives at most 30 days")
    try:
        url = urlsplit(body["url"])
    except ValueError as error:  # such as an unclosed [ of an IPv6 address
        raise bad_parameter("url", f"not a URL: {error}") from None
    if url.scheme or (url.netloc and url.netloc != request.url.netloc):
        raise bad_parameter("url", "links point at this server: give the path")
    # A path as the listings give it carries EXPORTER_ROOT_PATH; links sign the rest.
    path = strip_root(url.path, st.settings.root_path)
    if not may_link(principal, path):
        raise ApiError(403, f"{principal.label} may not download {path}")
    expires_at = datetime.now(UTC) + lifetime
    try:
        signed = sign(await st.links.key(), path, url.query, expires_at, principal.name,
                      token_identity(principal.token_id))
    except ValueError as error:
        raise bad_parameter("url", str(error)) from None
    base = str(request.base_url).rstrip("/")
    return JSONResponse(
        {"url": base + signed, "expires_at": expires_at.isoformat(timespec="seconds")},
        status_code=201,
    )


@router.get("/tokens")
async def list_tokens(request: Request) -> JSONResponse:
    st, _ = await require_admin(request)
    return JSONResponse([
        {"name": t.name, "scopes": t.scopes, "state": t.state,
         "created_at": t.created_at.isoformat(),
         "expires_at": t.expires_at.isoformat() if t.expires_at else None,
         "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
         "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None}
        for t in await st.tokens.list()
    ])


@router.delete("/tokens/{name}")
async def revoke_token(request: Request, name: str) -> JSONResponse:
    st, _ = await require_admin(request)
    if not await st.tokens.revoke(name):
        raise ApiError(404, f"no active token named {name!r}")
    return JSONResponse({"name": name, "state": "revoked"})
