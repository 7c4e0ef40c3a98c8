"""The benchmark's own embedded PostgreSQL, its demo table, and psql against it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import ROOT, Plan
from exporter.db import libpq_url
from exporter.embedded import EmbeddedPostgres, psql_path

# The same session settings as the exporter's connections, so psql writes the same bytes.
PSQL_ENV = {"PGTZ": "UTC", "PGDATESTYLE": "ISO, YMD", "PGCLIENTENCODING": "UTF8"}
GENERATED_VIEW = "bench_generated"


def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(libpq_url(url))
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def execute(url: str, statement: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(libpq_url(url))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def psql_command(url: str, copy: str) -> list[str]:
    """psql running one `\\copy ... TO STDOUT`, the reference every export is held to."""
    return [str(psql_path()), "-X", "-q", "-v", "ON_ERROR_STOP=1", libpq_url(url), "-c", copy]


def psql_env() -> dict[str, str]:
    return {**os.environ, **PSQL_ENV}


def _orders_rows(url: str) -> int:
    rows = fetch(url, "SELECT to_regclass('exports.orders') IS NOT NULL AS present")
    if not rows[0]["present"]:
        return -1
    return int(fetch(url, "SELECT count(*) AS n FROM exports.orders")[0]["n"])


def _load_demo(url: str, rows: int, log_path: Path) -> None:
    """`exporter demo --rows N`, exactly as a user would load it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        subprocess.run(
            [sys.executable, "-m", "exporter.cli", "demo", "--rows", str(rows)],
            # The rows only: given a files root (not the default ./var/files), `demo`
            # leaves it alone instead of writing its 1 GiB of demo files into the checkout.
            cwd=ROOT, env={**os.environ, "EXPORTER_DATABASE_URL": url,
                           "EXPORTER_FILES_ROOT": str(log_path.parent / "demo-files-unused")},
            stdout=log, stderr=subprocess.STDOUT, check=True,
        )


def _create_generated_view(url: str, rows: int) -> None:
    """Rows made on the fly, for the memory comparison: a 10,000,000-row table would
    take minutes to load and gigabytes of disk, and the server cannot tell the difference."""
    execute(url, f"""
        CREATE OR REPLACE VIEW exports.{GENERATED_VIEW} AS
        SELECT i AS id,
               'customer ' || (i % 1000) AS customer,
               round((i % 100000)::numeric / 100, 2) AS amount,
               timestamptz '2026-01-01 00:00:00+00' + i * interval '1 second' AS created_at,
               md5(i::text) AS note
        FROM generate_series(1::bigint, {int(rows)}::bigint) AS i""")


@contextmanager
def database(plan: Plan, log: Any = print) -> Iterator[str]:
    """The embedded PostgreSQL under the plan's folder (kept between runs), with
    `exports.orders` holding `plan.demo_rows` rows; stopped on the way out."""
    pg = EmbeddedPostgres(plan.work / "pgdata")
    url = pg.start()
    try:
        rows = _orders_rows(url)
        if rows != plan.demo_rows:
            log(f"loading {plan.demo_rows:,} demo rows (had {max(rows, 0):,})")
            _load_demo(url, plan.demo_rows, plan.logs / "demo.log")
        _create_generated_view(url, plan.generated_rows)
        execute(url, "VACUUM ANALYZE exports.orders")
        yield url
    finally:
        pg.stop()
