"""The export most tutorials show: SQLAlchemy streams rows, Python's csv module writes them.

A contender, to show what COPY-through-asyncpg buys. It is a good tutorial's version:
server-side cursor (`stream()` with `yield_per`) and rows written in batches, not the
worst one that loads everything with `fetchall()`. Run with
`NAIVE_DATABASE_URL=... uvicorn bench.naive_app:app`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from exporter.db import sqlalchemy_url

BATCH = 5000

engine = create_async_engine(sqlalchemy_url(os.environ["NAIVE_DATABASE_URL"]))
app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def rows_as_csv(table: str) -> AsyncIterator[bytes]:
    async with engine.connect() as conn:
        # `partitions()` needs its size: without it, on a text() query, SQLAlchemy held
        # the whole result (3.6 GB for 2,000,000 rows, see NOTES.md).
        result = await conn.stream(
            text(f"SELECT * FROM exports.{table}").execution_options(yield_per=BATCH)
        )
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(result.keys())
        async for rows in result.partitions(BATCH):
            writer.writerows(rows)
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()


@app.get("/export/{table}.csv")
async def export(table: str) -> StreamingResponse:
    if table not in ("orders", "bench_generated"):  # a benchmark app, not an SQL injection
        return StreamingResponse(iter([b"unknown table\n"]), status_code=404)
    return StreamingResponse(rows_as_csv(table), media_type="text/csv")
