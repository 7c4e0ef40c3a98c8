"""What the /links and /tokens routes do, out of the route module: make a signed link
for a token's holder, and describe the tokens for admins."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from exporter.access.links import (
    LINKABLE,
    LinkKeys,
    check_link_path,
    link_lifetime,
    sign,
    token_identity,
)
from exporter.access.principal import ANONYMOUS, TOKEN, Principal
from exporter.access.tokens import TokenInfo, TokenStore
from exporter.config import Settings
from exporter.errors import ApiError, bad_parameter
from exporter.export_names import dataset_names
from exporter.server.prefix import strip_root


class StoredExportsSeen(Protocol):
    """The stored exports (exporter/stored/, above this feature), as a link to one asks."""

    async def visible(self, principal: Principal, export_id: str) -> bool:
        """Whether the principal may see the export now."""


def may_link(principal: Principal, path: str) -> bool:
    """Whether the principal's scopes cover what `path` serves."""
    try:
        check_link_path(path)
    except ValueError as error:
        if not path.startswith(LINKABLE):
            return False  # answered as any target the principal may not download
        raise bad_parameter("url", str(error)) from None
    if path.startswith("/datasets/"):
        name = unquote(path[len("/datasets/"):])
        return bool(name) and any(principal.may_read_dataset(n) for n in dataset_names(name))
    if path.startswith("/files/"):
        relative = unquote(path[len("/files/"):])
        return principal.may_read_file(relative) or principal.may_list_folder(relative)
    # A stored export (/exports/): when the link is used, only its maker's (or an
    # admin's) answer.
    return True


async def _may_link_export(stored: StoredExportsSeen | None, principal: Principal,
                           path: str) -> bool:
    """A stored export (/exports/ID, /exports/ID/file, /exports/ID/{its file name}) is
    linked only if its maker may see it now: its own, of a dataset it may still read.
    Absent or not: the same 403."""
    parts = path.split("/")
    if len(parts) not in (3, 4) or parts[1] != "exports" or parts[3:] == [""]:
        return True
    return stored is None or await stored.visible(principal, parts[2])


async def create_link(settings: Settings, links: LinkKeys, stored: StoredExportsSeen | None,
                      principal: Principal, raw_body: bytes, netloc: str,
                      base_url: str) -> dict[str, str]:
    """POST /links: `{"url": path, "expires_in": duration}` signed for `principal`, as
    `{"url": full URL, "expires_at": ISO time}`."""
    if principal.kind != TOKEN or principal.token_id is None:
        raise principal.denied() if principal.kind == ANONYMOUS else ApiError(
            403, "links are made with a token"
        )
    try:
        body: Any = json.loads(raw_body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        raise ApiError(
            400, 'expected a JSON body: {"url": "/datasets/...", "expires_in": "15m"}'
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        raise bad_parameter("url", "'url' must be a path such as /datasets/orders.csv?id=gt.5")
    try:
        lifetime = link_lifetime(str(body.get("expires_in", "15m")))
    except ValueError as error:
        raise bad_parameter("expires_in", str(error)) from None
    try:
        url = urlsplit(body["url"])
    except ValueError as error:  # such as an unclosed [ of an IPv6 address
        raise bad_parameter("url", f"not a URL: {error}") from None
    if url.scheme or (url.netloc and url.netloc not in (netloc, settings.public_netloc)):
        raise bad_parameter("url", "links point at this server: give the path")
    # A path as the listings give it carries EXPORTER_ROOT_PATH; links sign the rest.
    path = strip_root(url.path, settings.root_path)
    if not may_link(principal, path) or not await _may_link_export(stored, principal, path):
        raise ApiError(403, f"{principal.label} may not download {path}")
    expires_at = datetime.now(UTC) + lifetime
    try:
        signed = sign(await links.key(), path, url.query, expires_at, principal.name,
                      token_identity(principal.token_id))
    except ValueError as error:
        raise bad_parameter("url", str(error)) from None
    # EXPORTER_PUBLIC_URL, as `exporter link` makes them; else the host the client asked.
    base = settings.public_base or base_url.rstrip("/")
    return {"url": base + signed,
            "expires_at": expires_at.isoformat(timespec="seconds")}


def describe_token(t: TokenInfo) -> dict[str, Any]:
    return {"name": t.name, "scopes": t.scopes, "state": t.state,
            "created_at": t.created_at.isoformat(),
            "expires_at": t.expires_at.isoformat() if t.expires_at else None,
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
            "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None}


async def list_tokens(tokens: TokenStore) -> list[dict[str, Any]]:
    return [describe_token(t) for t in await tokens.list()]


async def revoke_token(tokens: TokenStore, name: str) -> dict[str, str]:
    if not await tokens.revoke(name):
        raise ApiError(404, f"no active token named {name!r}")
    return {"name": name, "state": "revoked"}
