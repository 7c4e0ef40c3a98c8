"""`exporter token ...` and `exporter link ...`, and the local demo's token."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Annotated
from urllib.parse import SplitResult, urlsplit

import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.durations import parse_duration
from exporter.access.links import (
    OPERATOR,
    LinkKeys,
    check_link_path,
    link_lifetime,
    sign,
    split_query,
)
from exporter.access.principal import ADMIN, ALL_DATASETS, ALL_FILES, SCOPE_FORMS
from exporter.access.tokens import TokenStore
from exporter.clikit import fail, print_table, start, when, with_engine
from exporter.config import Settings
from exporter.server.prefix import strip_root

DEMO_TOKEN_NAME = "demo"
DEMO_SCOPES = [ALL_DATASETS, ALL_FILES, ADMIN]

tokens = typer.Typer(name="token", help="create, list and revoke API tokens",
                     no_args_is_help=True)


def _duration(command: str, text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        fail(f"{command}: {error}")


@tokens.command("create", help="print a new token (shown once)")
def token_create(
    name: Annotated[str, typer.Option(
        "--name", metavar="NAME", help="the token's name, unique among active tokens")],
    scope: Annotated[list[str], typer.Option(
        "--scope", metavar="SCOPE",
        help=f"{SCOPE_FORMS}; repeat for several")],
    expires: Annotated[str | None, typer.Option(
        "--expires", metavar="DURATION",
        help="lifetime such as 30d or 12h (default: none)")] = None,
) -> None:
    settings = start()
    # Checked before the database starts: a typo costs nothing.
    lifetime = _duration("exporter token", expires) if expires else None
    try:
        secret = with_engine(settings, "token",
                             lambda engine: TokenStore(engine).create(name, scope, lifetime))
    except ValueError as error:  # a bad name or scope, or the name is taken
        fail(f"exporter token: {error}")
    print(secret)
    print(f"token {name!r} created; it is shown this once", file=sys.stderr)


@tokens.command("list", help="name, scopes, created, expires, last used, revoked")
def token_list() -> None:
    settings = start()
    found = with_engine(settings, "token", lambda engine: TokenStore(engine).list())
    print_table(["name", "scopes", "created", "expires", "last used", "revoked", "state"],
                [(t.name, " ".join(t.scopes), when(t.created_at), when(t.expires_at),
                  when(t.last_used_at), when(t.revoked_at), t.state) for t in found])


@tokens.command("revoke", help="stop a token at once, everywhere")
def token_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the token's name")],
) -> None:
    settings = start()
    if not with_engine(settings, "token", lambda engine: TokenStore(engine).revoke(name)):
        fail(f"no active token named {name!r}", 1)
    print(f"token {name!r} revoked", file=sys.stderr)


def link(
    target: Annotated[str, typer.Argument(
        metavar="URL|rotate-key",
        help="a URL or path under /datasets/, /files/ or /exports/, with its query")],
    expires: Annotated[str, typer.Option(
        "--expires", metavar="DURATION", help="lifetime, at most 30d")] = "15m",
) -> None:
    settings = start()
    if target == "rotate-key":
        if settings.link_secret:
            fail("EXPORTER_LINK_SECRET is set: change it to rotate the key", 1)
        with_engine(settings, "link", lambda engine: LinkKeys(engine, None).rotate())
        print("link signing key rotated: every link made before no longer works",
              file=sys.stderr)
        return
    # Everything is checked before the database starts: a typo costs nothing.
    try:
        lifetime = link_lifetime(expires)
    except ValueError as error:
        fail(f"exporter link: --expires: {error}")
    try:
        url = urlsplit(target)
        url.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as error:
        fail(f"exporter link: not a URL: {error}")
    # A URL as users see it, behind a proxy, carries EXPORTER_ROOT_PATH: signed without it.
    path = strip_root(url.path, settings.root_path)
    try:
        check_link_path(path)
    except ValueError as error:
        fail(f"exporter link: {error}")
    if split_query(url.query)[1]:
        fail("exporter link: the URL is already signed (or names a ~ parameter of"
             " signed links)")
    base = link_base(settings, url)
    expires_at = datetime.now(UTC) + lifetime

    async def signed(engine: AsyncEngine) -> str:
        key = await LinkKeys(engine, settings.link_secret).key()
        return sign(key, path, url.query, expires_at, OPERATOR, OPERATOR)

    print(base + with_engine(settings, "link", signed))
    print(f"valid until {when(expires_at)}", file=sys.stderr)


def link_base(settings: Settings, url: SplitResult) -> str:
    """Where an operator's link starts, with the prefix, as POST /links makes them: the
    configured public URL; else the URL given, or the server's own host and port."""
    given = None
    if url.scheme or url.netloc:
        if url.scheme not in ("http", "https") or not url.hostname:
            fail("exporter link: give a path such as /files/x, or an http(s) URL")
        given = f"{url.scheme}://{url.netloc}"
    if settings.public_url:
        if given not in (None, settings.public_url):
            fail(f"exporter link: links point at EXPORTER_PUBLIC_URL ({settings.public_url}):"
                 " give the path, or a URL under it")
        return settings.public_url + settings.root_path
    if given:
        return given + settings.root_path
    host = settings.host
    if ip_address_or_none(host) in (IPv4Address("0.0.0.0"), IPv6Address("::")):
        fail(f"exporter link: the server listens on every address (EXPORTER_HOST={host}):"
             " set EXPORTER_PUBLIC_URL to the URL clients use, or give a full URL")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}{settings.root_path}"


def ip_address_or_none(host: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(host)
    except ValueError:
        return None


def register(app: typer.Typer) -> None:
    app.add_typer(tokens)
    app.command("link", help="print a signed, expiring URL; or `link rotate-key`")(link)


async def demo_token(engine: AsyncEngine, path: Path) -> str:
    """The local demo's token, kept in the data folder beside the database it opens."""
    store = TokenStore(engine)
    kept = path.read_text().strip() if path.exists() else ""  # noqa: ASYNC240 - tiny, at start-up
    if kept and await store.principal(kept) is not None:
        return kept
    await store.revoke(DEMO_TOKEN_NAME)
    secret = await store.create(DEMO_TOKEN_NAME, DEMO_SCOPES, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret
