"""What an XLSX export costs against psql's CSV and against the naive way to a workbook.

    .venv/bin/python -m bench.xlsx [--quick] [--rounds N]

The demo table (2,000,000 rows; `--quick` 20,000) of the benchmark's embedded PostgreSQL
(var/bench/, shared with ./scripts/bench), in interleaved rounds: psql `\\copy` CSV (the
reference), the exporter's `.csv` and `.xlsx` through real curl, psql `\\copy` of the
XLSX renderer's own COPY (the sheet XML PostgreSQL writes, without the ZIP: the
database's share of the time), and xlsxwriter in constant-memory mode fed by asyncpg
rows (`bench/xlsx_naive.py`, what a user would write). Prints markdown with time, size
and peak RSS (the server's, sampled; the naive script's own high-water mark).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import time

from bench.database import database
from bench.exports import Query, curl_contender, exporter_service, psql_bytes, psql_contender
from bench.harness import (
    MB,
    ROOT,
    Contender,
    Plan,
    Run,
    fmt_bytes,
    fmt_seconds,
    interleaved,
    machine,
)
from exporter.exports.catalog import Catalog
from exporter.exports.query import parse
from exporter.exports.renderers.xlsx import XLSX
from exporter.exports.sql import select_sql

SELECT = "SELECT * FROM exports.orders"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sheet_copy(url: str) -> str:
    """The XLSX renderer's COPY of the whole demo table, as psql runs it."""
    from exporter.config import Settings
    from exporter.db import create_engine

    async def statement() -> str:
        engine = create_engine(Settings(), url)
        try:
            dataset = (await Catalog(engine, "exports").reload())["orders"]
        finally:
            await engine.dispose()
        query = parse(dataset, [])
        return XLSX.for_query(query).body(select_sql(query)).query

    body = asyncio.run(statement())
    return f"\\copy ({body}) TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"


def naive_contender(plan: Plan, url: str) -> Contender:
    out = plan.work / "naive.xlsx"
    command = [sys.executable, "-m", "bench.xlsx_naive", url, str(out)]

    def run() -> Run:
        started = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
        seconds = time.monotonic() - started
        size = out.stat().st_size
        out.unlink()
        return Run(seconds, size, peak_rss=int(done.stdout.split()[-1]))

    # Minutes a run on the full table: once is enough to see the difference.
    return Contender("xlsxwriter constant_memory, asyncpg rows", " ".join(command[1:]),
                     run, max_runs=1 if not plan.quick else None)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.xlsx", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick)
    plan = dataclasses.replace(plan, repetitions=args.rounds or (2 if args.quick else 3))
    with database(plan, log) as url, exporter_service(plan, url, "xlsx", {
            "EXPORTER_EXPORTS_RESUME": "false"}) as server:
        server.start("/healthz")
        csv = Query("csv", f"\\copy ({SELECT}) TO STDOUT WITH (FORMAT csv, HEADER)", "")
        sheet = Query("sheet", sheet_copy(url), "")
        sizes = {q.name: psql_bytes(url, q.copy) for q in (csv, sheet)}
        contenders = [
            psql_contender("psql CSV", url, csv, sizes["csv"]),
            curl_contender("exporter .csv", server, "/datasets/orders.csv", sizes["csv"]),
            curl_contender("exporter .xlsx", server, "/datasets/orders.xlsx"),
            psql_contender("psql of the .xlsx COPY (sheet XML, no ZIP)", url, sheet,
                           sizes["sheet"]),
            naive_contender(plan, url),
        ]
        log(f"{plan.repetitions} interleaved rounds")
        results = interleaved(contenders, plan.repetitions, log)
    reference = results[0]
    command = f".venv/bin/python -m bench.xlsx{' --quick' if args.quick else ''}"
    lines = [
        f"### XLSX: {plan.demo_rows:,} rows of `exports.orders`", "",
        f"`{command}` ({machine()}), {plan.repetitions} interleaved rounds (the"
        " xlsxwriter run once on the full table).", "",
        "| contender | median time | size | vs psql CSV | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.contender.name} | {fmt_seconds(r.median_seconds)} | "
                     f"{r.bytes / MB:,.1f} MB | "
                     f"**{reference.median_seconds / r.median_seconds:.2f}×** | "
                     f"{fmt_bytes(r.peak_rss) if r.peak_rss else '—'} |")
    xlsx, naive = results[2], results[4]
    lines += ["", f"The exporter's XLSX is {naive.median_seconds / xlsx.median_seconds:.1f}×"
              f" as fast as xlsxwriter's and {sizes['csv'] / xlsx.bytes:.1f}× smaller than"
              f" the CSV; its server peaked at {fmt_bytes(xlsx.peak_rss)} against"
              f" {fmt_bytes(results[1].peak_rss)} for the CSV."]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
