"""The change cursor: a signed token for one export's snapshot, and `?since=` with it.

Why it works this way: docs/internals.md, section `exports/cursor.py`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from exporter.errors import DRIVER_ERRORS, ApiError, bad_parameter, postgres_message, sqlstate

log = logging.getLogger(__name__)

SINCE = "since"
HEADER = "Export-Cursor"
VERSION = 1
STANDBY = 0x01
# Datasets whose rows carry an xmin: tables (partitioned ones too: each partition's rows
# have theirs) and materialized views. Views and foreign tables have none.
KINDS_WITH_XMIN = ("table", "materialized view")
# xids of [xmin, xmax) probed with pg_xact_status at a snapshot: 46 ms for all of them
# (measured; the window is that wide only behind a long-running transaction).
PROBE_LIMIT = 100_000
# xids not visible kept in a token; beyond, the conservative bound takes over.
MAX_LISTED = 256
# A token longer than this is refused before decoding: the longest this server makes
# (MAX_LISTED xids spread over PROBE_LIMIT) has about 750 characters.
MAX_LENGTH = 1024
# How far (in xids) the database may have moved past a cursor's xmin: beyond, 32-bit
# xmin can no longer be told apart (wraparound).
MAX_AGE = 2**31 - 1
_MAC_SIZE = 16
INSUFFICIENT_PRIVILEGE = "42501"
NO_IDENTITY = (f"'{SINCE}' cannot be answered: the database role may not run"
               " pg_control_system(), which binds cursors to their cluster (GRANT EXECUTE ON"
               " FUNCTION pg_control_system() TO the role)")
_WRAP = 2**32
_KEY_LABEL = b"exporter export cursor v1"
REPULL = "pull everything again (without 'since') and keep the new Export-Cursor"


@dataclass(frozen=True)
class Cursor:
    """A snapshot, as much of it as `since` needs. xids are 64-bit (xid8)."""

    system: int  # the cluster's system identifier
    xmin: int
    xmax: int
    conservative: int  # every xid from here on counts as not visible (<= xmax)
    invisible: tuple[int, ...]  # sorted xids in [xmin, conservative) not visible
    standby: bool = False


@dataclass(frozen=True)
class Snapshot:
    """What an export's first statements read: its start and its snapshot, and the
    xid its transaction's age() counts from (None if it could not be read)."""

    time: Any  # datetime, now()
    cursor: Cursor
    reference: int | None = None


def cursor_key(link_key: bytes) -> bytes:
    """The cursor's own key, derived from the link-signing key (a rotation of that key
    invalidates cursors too: their clients are told to pull everything again)."""
    return hmac.new(link_key, _KEY_LABEL, hashlib.sha256).digest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def byte(self) -> int:
        if self._at >= len(self._data):
            raise ValueError("truncated")
        value = self._data[self._at]
        self._at += 1
        return value

    def fixed(self, size: int) -> int:
        if self._at + size > len(self._data):
            raise ValueError("truncated")
        value = int.from_bytes(self._data[self._at:self._at + size], "big")
        self._at += size
        return value

    def varint(self) -> int:
        value = shift = 0
        while True:
            if shift > 63:
                raise ValueError("number too long")
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def done(self) -> bool:
        return self._at == len(self._data)


def encode(cursor: Cursor, key: bytes) -> str:
    body = bytearray([VERSION, STANDBY if cursor.standby else 0])
    body += cursor.system.to_bytes(8, "big")
    body += _varint(cursor.xmin)
    body += _varint(cursor.xmax - cursor.xmin)
    body += _varint(cursor.conservative - cursor.xmin)
    body += _varint(len(cursor.invisible))
    previous = cursor.xmin
    for xid in cursor.invisible:
        body += _varint(xid - previous)
        previous = xid
    mac = hmac.new(key, bytes(body), hashlib.sha256).digest()[:_MAC_SIZE]
    return base64.urlsafe_b64encode(bytes(body) + mac).rstrip(b"=").decode()


def _invalid(reason: str) -> ApiError:
    return bad_parameter(SINCE, f"not a cursor of this server ({reason}): send back the"
                         f" {HEADER} header of an export as it was, or {REPULL}")


def decode(token: str, key: bytes) -> Cursor:
    """The cursor a token stands for; a 400 naming `since` for anything else."""
    if not token:
        raise _invalid("empty")
    if len(token) > MAX_LENGTH:
        raise _invalid(f"longer than {MAX_LENGTH} characters")
    if not token.isascii() or not all(c.isalnum() or c in "-_" for c in token):
        raise _invalid("a cursor is made of A-Z, a-z, 0-9, '-' and '_'")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise _invalid("not base64url") from None
    if len(raw) < 2 + 8 + _MAC_SIZE:
        raise _invalid("truncated")
    body, mac = raw[:-_MAC_SIZE], raw[-_MAC_SIZE:]
    expected = hmac.new(key, body, hashlib.sha256).digest()[:_MAC_SIZE]
    if not hmac.compare_digest(mac, expected):
        raise _invalid("its signature does not match")
    if body[0] != VERSION:
        raise _invalid(f"version {body[0]}, this server reads version {VERSION}")
    try:
        return _read_body(_Reader(body))
    except ValueError as error:
        # Signed by this server yet unreadable: only a bug makes that.
        raise _invalid(str(error)) from None


def _read_body(reader: _Reader) -> Cursor:
    reader.byte()  # the version, checked
    flags = reader.byte()
    system = reader.fixed(8)
    xmin = reader.varint()
    xmax = xmin + reader.varint()
    conservative = xmin + reader.varint()
    count = reader.varint()
    if conservative > xmax or count > MAX_LISTED or xmax >= 2**64:
        raise ValueError("inconsistent")
    invisible = []
    previous = xmin
    for _ in range(count):
        previous += reader.varint()
        invisible.append(previous)
    if (invisible and invisible[-1] >= conservative) or not reader.done():
        raise ValueError("inconsistent")
    return Cursor(system, xmin, xmax, conservative, tuple(invisible), bool(flags & STANDBY))


def refuse_without_xmin(kind: str, dataset: str) -> ApiError:
    return bad_parameter(
        SINCE, f"'{dataset}' is a {kind}: its rows carry no transaction id (xmin), so"
        f" there is no telling which changed; 'since' works on tables and materialized views")


# The snapshot, then (probed after it, in the same statement) which xids of its window
# are still in progress: subtransactions of its xip members, and those members.
_SNAPSHOT_SQL = """
WITH s AS MATERIALIZED (
    SELECT now() AS at, pg_current_snapshot() AS snap, pg_is_in_recovery() AS standby,
           (SELECT system_identifier FROM pg_control_system()) AS system,
           set_config('statement_timeout',
                      coalesce($1, current_setting('statement_timeout')), true) AS timeout
)
SELECT s.at, s.timeout, pg_snapshot_xmin(s.snap)::text::bigint AS xmin,
       pg_snapshot_xmax(s.snap)::text::bigint AS xmax, s.standby, s.system,
       age(xid(pg_snapshot_xmax(s.snap))) AS ahead,
       ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(s.snap) AS x ORDER BY 1) AS xip,
       ARRAY(SELECT g FROM generate_series(
                 pg_snapshot_xmin(s.snap)::text::bigint,
                 least(pg_snapshot_xmax(s.snap)::text::bigint,
                       pg_snapshot_xmin(s.snap)::text::bigint + {limit}) - 1) AS g
             WHERE NOT s.standby AND pg_xact_status(g::text::xid8) = 'in progress'
             ORDER BY 1) AS running
FROM s
"""
# After every probe: the xip members that ended meanwhile.
_ENDED_SQL = ("SELECT coalesce(min(x), -1) FROM unnest($1::bigint[]) AS x"
              " WHERE pg_xact_status(x::text::xid8) IS DISTINCT FROM 'in progress'")


async def take(conn: AsyncConnection, statement_timeout: str | None = None
               ) -> Snapshot | None:
    """As the first statement of a REPEATABLE READ transaction: its snapshot and cursor,
    and (the same round trip) the transaction's `statement_timeout` for the statements
    after it, if given. None, with the transaction rolled back, if the role may not read
    the cluster's identity (EXECUTE on pg_control_system() revoked from PUBLIC): no
    cursor then, nor timeout."""
    try:
        row = await probe(conn, statement_timeout)
    except DRIVER_ERRORS as error:
        if sqlstate(error) != INSUFFICIENT_PRIVILEGE:
            raise
        log.warning("no change cursor: %s", postgres_message(error))
        await conn.rollback()
        return None
    return await settle(conn, row)


async def probe(conn: AsyncConnection, statement_timeout: str | None = None) -> Any:
    """The first statement: the snapshot and its window's xids in progress (and the
    timeout of the statements after it, if given)."""
    return (await conn.exec_driver_sql(_SNAPSHOT_SQL.format(limit=int(PROBE_LIMIT)),
                                       (statement_timeout,))).one()


async def settle(conn: AsyncConnection, row: Any) -> Snapshot:
    """After the probe (strictly: a statement of its own), which xip members ended
    meanwhile, and the cursor."""
    xmin, xmax = int(row.xmin), int(row.xmax)
    xip = [int(x) for x in row.xip]
    conservative = xmax
    if row.standby:
        # The standby's xip is empty whatever runs on the primary: nothing in the
        # window can be told visible.
        conservative = xmin
    elif xip:
        ended = int((await conn.exec_driver_sql(_ENDED_SQL, (xip,))).scalar_one())
        if ended >= 0:
            conservative = ended
    conservative = min(conservative, xmin + PROBE_LIMIT)
    invisible = sorted({*xip, *(int(x) for x in row.running)})
    invisible = [x for x in invisible if x < conservative]
    if len(invisible) > MAX_LISTED:
        conservative, invisible = invisible[MAX_LISTED], invisible[:MAX_LISTED]
    cursor = Cursor(int(row.system) % 2**64, xmin, xmax, conservative, tuple(invisible),
                    bool(row.standby))
    return Snapshot(row.at, cursor, reference_of(xmax, int(row.ahead)))


# In a transaction that imported the snapshot (exports/parallel.py): what `reference_of`
# reads there, with the statement timeout of its statements after it.
AHEAD_SQL = ("SELECT set_config('statement_timeout', $1, true),"
             " age(xid(pg_snapshot_xmax(pg_current_snapshot())))")


def reference_of(xmax: int, ahead: int) -> int | None:
    """The xid a transaction's age() counts from, given its snapshot's xmax and the age
    of that xmax in it; None where that says nothing (below)."""
    # age() of a special xid (xmax's low half 0 to 2 at a wraparound) says nothing.
    return xmax + ahead if xmax % _WRAP > 2 and ahead >= 0 else None


def check(since: Cursor, now: Snapshot) -> None:
    """Whether `since` can be answered in the database `now` was taken in (410 if not)."""
    if since.system != now.cursor.system:
        raise ApiError(410, f"'{SINCE}': the cursor was made by another PostgreSQL cluster"
                       f" (a restore or a new database server): {REPULL}")
    if max(now.cursor.xmax, now.reference or 0) - since.xmin > MAX_AGE:
        raise ApiError(410, f"'{SINCE}': the cursor is older than 2^31 transactions of"
                       f" this database: {REPULL}")


def condition(since: Cursor, reference: int | None = None) -> str:
    """SQL that is true for the rows written by transactions not visible in `since`.

    Only integers of a verified token (and of the database) go into it. `reference` is
    the xid the transaction's age() counts from (Snapshot.reference); without one, the
    same test is made on xmin's text, more slowly.
    """
    start = since.conservative - since.xmin
    if reference is not None:
        k = reference - since.xmin  # the age of the cursor's xmin
        # age(1) = age(2) = 2^31 - 1, kept out by the upper bound.
        parts = [f"age(xmin) BETWEEN {k - MAX_AGE} AND {min(k - start, MAX_AGE - 1)}"]
        if since.invisible:
            ages = ", ".join(str(reference - x) for x in since.invisible)
            parts.append(f"age(xmin) IN ({ages})")
        return f"({' OR '.join(parts)})"
    low = since.xmin % _WRAP
    d = f"((xmin::text::bigint - {low} + {_WRAP}) % {_WRAP})"
    parts = [f"{d} BETWEEN {start} AND {MAX_AGE}"]
    if since.invisible:
        offsets = ", ".join(str(x - since.xmin) for x in since.invisible)
        parts.append(f"{d} IN ({offsets})")
    sql = " OR ".join(parts)
    # Bootstrap (1) and frozen (2) xids are old rows; they map into the window only
    # when it spans the wraparound of the 32-bit counter.
    special = [x for x in (1, 2) if _new(since, (x - low) % _WRAP)]
    if special:
        return f"(({sql}) AND xmin::text NOT IN ({', '.join(repr(str(x)) for x in special)}))"
    return f"({sql})"


def _new(since: Cursor, d: int) -> bool:
    return (since.conservative - since.xmin <= d <= MAX_AGE
            or since.xmin + d in since.invisible)
