"""API tokens: shown once, kept only as a SHA-256 hash, checked on every request.

Checked from memory once known (access/token_cache.py: a revoked token, or a narrowed
scope, stops working in every server process as soon as the database's notification
arrives); in the database while the process cannot hear the notifications.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.principal import TOKEN, Principal, check_scope, token_limit_key
from exporter.access.token_cache import TokenCache
from exporter.streaming import run_detached
from exporter.tables import tokens

log = logging.getLogger(__name__)

TOKEN_PREFIX = "exp_"
USED_EVERY = 60.0  # seconds between the writes of a token's last_used_at
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_token_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def hash_secret(secret: str) -> bytes:
    # Tokens carry 256 random bits: a fast hash is enough, a slow KDF would add nothing.
    return hashlib.sha256(secret.encode()).digest()


@dataclass
class TokenInfo:
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            return "expired"
        return "active"


class TokenStore:
    def __init__(self, engine: AsyncEngine, cache: TokenCache | None = None) -> None:
        self._engine = engine
        self._used: dict[int, float] = {}  # token id: when this process last wrote it
        self._cache = cache or TokenCache(None, 0)

    async def create(self, name: str, scopes: list[str], expires_in: timedelta | None) -> str:
        if not is_token_name(name):
            raise ValueError("a token name is 1 to 64 letters, digits, '.', '_' or '-'")
        if not scopes:
            raise ValueError("a token needs at least one scope")
        for scope in scopes:
            check_scope(scope)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = datetime.now(UTC) + expires_in if expires_in else None
        async with self._engine.begin() as conn:
            exists = await conn.scalar(sa.select(sa.func.count()).where(
                tokens.c.name == name, tokens.c.revoked_at.is_(None)))
            if exists:
                raise ValueError(f"a token named {name!r} exists (revoke it, or pick another name)")
            await conn.execute(sa.insert(tokens).values(
                name=name, secret_hash=hash_secret(secret), scopes=scopes, expires_at=expires_at,
            ))
        return secret

    async def revoke(self, name: str) -> bool:
        if not is_token_name(name):
            # No token has it; a NUL in it would make PostgreSQL refuse the statement.
            return False
        async with self._engine.begin() as conn:
            result = await conn.execute(
                sa.update(tokens).where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
                .values(revoked_at=sa.func.now())
            )
        # This process at once; the others when the trigger's notification arrives.
        self._cache.forget()
        return bool(result.rowcount)

    async def list(self) -> list[TokenInfo]:
        columns = [tokens.c.name, tokens.c.scopes, tokens.c.created_at, tokens.c.expires_at,
                   tokens.c.last_used_at, tokens.c.revoked_at]
        order = [tokens.c.name, tokens.c.created_at]
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(*columns).order_by(*order))).all()
        return [TokenInfo(*row) for row in rows]

    async def principal(self, secret: str) -> Principal | None:
        """The token's principal, or None for an unknown, revoked or expired token."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
            return None
        digest = hash_secret(secret)
        known = self._cache.get(digest)
        if isinstance(known, Principal):
            self._mark_used(known)
            return known
        generation = self._cache.generation
        async with self._engine.connect() as conn:
            # One statement, no transaction around it: BEGIN and COMMIT were two of the
            # five round trips every request with a token paid.
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            row = (await conn.execute(
                sa.select(tokens.c.id, tokens.c.name, tokens.c.scopes, tokens.c.secret_hash,
                          tokens.c.expires_at)
                .where(tokens.c.secret_hash == digest, tokens.c.revoked_at.is_(None),
                       sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > sa.func.now()))
            )).first()
        if row is None or not hmac.compare_digest(row.secret_hash, digest):
            return None
        principal = _principal(row)
        # Unknown secrets are not kept: guessing them must not fill the memory.
        self._cache.put(digest, principal, row.expires_at, generation)
        self._mark_used(principal)
        return principal

    def _mark_used(self, principal: Principal) -> None:
        """Write last_used_at at most once a minute per token (the WHERE, for every
        process), tried at most once a minute per token by this process, beside the
        request rather than on its way."""
        token_id = principal.token_id
        now = time.monotonic()
        if token_id is None or now - self._used.get(token_id, -USED_EVERY) < USED_EVERY:
            return
        self._used[token_id] = now
        run_detached(self._write_used(token_id))

    async def _write_used(self, token_id: int) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    sa.update(tokens).where(
                        tokens.c.id == token_id,
                        sa.or_(tokens.c.last_used_at.is_(None),
                               tokens.c.last_used_at
                               < sa.func.now() - sa.text("interval '1 minute'")),
                    ).values(last_used_at=sa.func.now())
                )
        except Exception as error:
            log.warning("could not write when token #%s was last used: %s", token_id, error)

    async def by_name(self, name: str) -> Principal | None:
        """The active token of that name (a signed link acts with its maker's scopes, and
        checks that its maker is still this very token by `token_id`)."""
        if not is_token_name(name):
            return None
        known = self._cache.get(("name", name))
        if isinstance(known, Principal):
            return known
        generation = self._cache.generation
        async with self._engine.connect() as conn:
            row: Any = (await conn.execute(
                sa.select(tokens.c.id, tokens.c.name, tokens.c.scopes, tokens.c.expires_at)
                .where(tokens.c.name == name, tokens.c.revoked_at.is_(None),
                       sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > sa.func.now()))
            )).first()
        if row is None:
            return None
        principal = _principal(row)
        self._cache.put(("name", name), principal, row.expires_at, generation)
        return principal


def _principal(row: Any) -> Principal:
    return Principal(TOKEN, row.name, frozenset(row.scopes), token_id=row.id,
                     limit_key=token_limit_key(row.id, row.name))
