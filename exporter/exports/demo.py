"""Demo data, generated in SQL: `exports.orders` with awkward values, and a view over it."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.exports.sql import quote_ident, quote_literal

# Values that break naive CSV and JSON writers; NULL and '' are different things.
NOTES = [
    "plain note",
    "comma, inside",
    'double "quotes" inside',
    "line\nbreak",
    "windows\r\nline break",
    "back\\slash \\N and \\\\ two",
    "tab\there",
    "Ünïcødé: façade, naïve, Zürich",
    "emoji 🚀📦✅",
    "all at once: \"a\", b\\c\n\td 😀",
    "control \x01\x02\x1f bytes",
    "",
    None,
]
CUSTOMERS = ["Alice", "Bob", "Zoë Müller", "José Ñúñez", "李雷", "O'Brien & Sons",
             "Smith, John", 'Ahmed "the Great"']


def _array(values: list[str | None]) -> str:
    items = ", ".join("NULL" if v is None else quote_literal(v) for v in values)
    return f"ARRAY[{items}]::text[]"


def _statements(schema: str) -> list[str]:
    s = quote_ident(schema)
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"DROP VIEW IF EXISTS {s}.daily_revenue",
        f"DROP TABLE IF EXISTS {s}.orders",
        f"""
        CREATE TABLE {s}.orders (
            id          bigint NOT NULL,
            customer    text NOT NULL,
            amount      numeric(12,2) NOT NULL,
            created_at  timestamptz NOT NULL,
            updated_at  timestamptz NOT NULL,
            ship_date   date,
            paid        boolean,
            order_uuid  uuid NOT NULL,
            details     jsonb,
            tags        text[],
            note        text
        )""",
        f"""
        INSERT INTO {s}.orders
        SELECT i,
               ({_array(list(CUSTOMERS))})[1 + i % {len(CUSTOMERS)}],
               round(((i * 7919) % 1000000)::numeric / 100 + 0.01, 2),
               timestamptz '2026-01-01 00:00:00+00' + i * interval '25 seconds',
               timestamptz '2026-01-01 00:00:00+00' + i * interval '25 seconds'
                   + (i % 1000) * interval '1 minute' + (i % 997) * interval '1 microsecond',
               CASE WHEN i % 10 = 0 THEN NULL ELSE date '2026-01-03' + (i / 3456)::int END,
               CASE WHEN i % 7 = 0 THEN NULL ELSE i % 3 <> 0 END,
               md5(i::text)::uuid,
               CASE WHEN i % 17 = 0 THEN NULL ELSE jsonb_build_object(
                   'items', 1 + i % 5,
                   'gift', i % 11 = 0,
                   'source', (ARRAY['web', 'app', 'phone'])[1 + i % 3],
                   'meta', jsonb_build_object('ratio', (i % 1000) / 7.0, 'path', 'a\\b"c'))
               END,
               CASE WHEN i % 13 = 0 THEN NULL
                    WHEN i % 13 = 1 THEN ARRAY[]::text[]
                    ELSE ARRAY['tag' || i % 5, 'with, comma', 'quote"d']
               END,
               ({_array(NOTES)})[1 + i % {len(NOTES)}]
        FROM generate_series(1::bigint, $1::bigint) AS i""",
        f"ALTER TABLE {s}.orders ADD PRIMARY KEY (id)",
        f"CREATE INDEX orders_updated_at_idx ON {s}.orders (updated_at)",
        f"""
        CREATE VIEW {s}.daily_revenue AS
        SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
               count(*) AS orders,
               sum(amount) AS revenue,
               count(*) FILTER (WHERE paid) AS paid_orders
        FROM {s}.orders
        GROUP BY 1""",
        f"ANALYZE {s}.orders",
    ]


async def load(engine: AsyncEngine, schema: str, rows: int) -> None:
    """(Re)create the demo table with `rows` rows and its view."""
    # exec_driver_sql: the statements hold literals with colons that text() would
    # take for bind parameters.
    async with engine.begin() as conn:
        for statement in _statements(schema):
            await conn.exec_driver_sql(statement, (rows,) if "$1" in statement else ())


async def has_datasets(engine: AsyncEngine, schema: str) -> bool:
    async with engine.connect() as conn:
        found = await conn.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = :schema"
                " AND c.relkind IN ('r', 'p', 'v', 'm', 'f'))"
            ),
            {"schema": schema},
        )
    return bool(found)
