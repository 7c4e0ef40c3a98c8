"""Parquet and Arrow exports against psql's CSV and DuckDB's own Parquet export.

    .venv/bin/python -m bench.arrow [--quick] [--rows N] [--rounds N] [--work DIR]

The demo table (`exports.orders`, N rows; default 2,000,000, `--quick` 20,000) in the
benchmark's embedded PostgreSQL (var/bench-arrow/, kept between runs), one `exporter
serve` with default settings, interleaved rounds. Contenders: `psql \\copy` of the table
as CSV (the reference); the exporter's `.csv`, `.parquet` and `.arrow` (curl, server peak
RSS sampled); DuckDB's `COPY (SELECT * FROM postgres_scan(...)) TO 'x.parquet'` (the tool
a user would pick instead; its own peak RSS). Prints markdown with same-run ratios (the
machine may be loaded: compare ratios, not seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.database import database, psql_command, psql_env
from bench.exports import exporter_service
from bench.harness import (
    MB,
    Contender,
    Result,
    RssSampler,
    Run,
    Service,
    arguments,
    curl,
    fmt_bytes,
    fmt_seconds,
    interleaved,
    log,
    measured_by,
    plan_of,
)
from exporter.db import libpq_url

SELECT = "SELECT * FROM exports.orders"

# DuckDB in a process of its own (its memory measured alone), its postgres extension
# loaded from the wheel of its exact version (offline).
DUCKDB_SCRIPT = """
import pathlib, shutil, sys, tempfile
import duckdb, duckdb_extension_postgres
found = next(pathlib.Path(duckdb_extension_postgres.__file__).parent.glob(
    'extensions/*/postgres.duckdb_extension'))
folder = pathlib.Path(tempfile.mkdtemp())
shutil.copy(found, folder / 'postgres_scanner.duckdb_extension')
con = duckdb.connect()
con.sql(f"LOAD '{folder / 'postgres_scanner.duckdb_extension'}'")
dsn, out = sys.argv[1], sys.argv[2]
con.sql(f"COPY (SELECT * FROM postgres_scan('{dsn}', 'exports', 'orders')) TO '{out}'"
        " (FORMAT parquet, COMPRESSION zstd)")
shutil.rmtree(folder)
"""


def psql_contender(url: str) -> Contender:
    command = psql_command(url, f"\\copy ({SELECT}) TO STDOUT WITH (FORMAT csv, HEADER)")

    def run() -> Run:
        with tempfile.TemporaryFile() as out:
            started = time.monotonic()
            process = subprocess.Popen(command, stdout=out, env=psql_env())
            with RssSampler(process.pid) as rss:
                if process.wait() != 0:
                    raise RuntimeError("psql failed")
            seconds = time.monotonic() - started
            return Run(seconds, out.tell(), peak_rss=rss.peak)

    return Contender("psql \\copy CSV", "psql -c '\\copy (...) TO STDOUT (FORMAT csv, HEADER)'",
                     run, reference=True)


def duckdb_contender(url: str, work: Path) -> Contender:
    target = work / "duckdb.parquet"
    # postgres_scan takes a libpq connection string: the socket folder as `host`.
    dsn = libpq_url(url)

    def run() -> Run:
        target.unlink(missing_ok=True)
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-c", DUCKDB_SCRIPT, dsn, str(target)],
                                   env={**os.environ, **psql_env()})
        with RssSampler(process.pid) as rss:
            if process.wait() != 0:
                raise RuntimeError("duckdb failed")
        return Run(time.monotonic() - started, target.stat().st_size, peak_rss=rss.peak)

    return Contender("DuckDB postgres_scan → Parquet",
                     "COPY (SELECT * FROM postgres_scan(...)) TO 'x.parquet'", run)


def exporter_contender(server: Service, extension: str) -> Contender:
    path = f"/datasets/orders.{extension}"

    def run() -> Run:
        r = curl(server.url + path)
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}")
        return Run(r.seconds, r.bytes, first_byte=r.first_byte)

    return Contender(f"exporter .{extension}", f"curl -o /dev/null {path}", run,
                     server_pid=lambda: server.pid)


def table(results: list[Result], reference: Result, csv: Result) -> list[str]:
    rows = ["| contender | command | median time | vs psql CSV time | size | smaller than"
            " CSV | first byte | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        first = f"{r.first_byte * 1000:,.0f} ms" if r.first_byte is not None else "–"
        rows.append(
            f"| {r.contender.name} | `{r.contender.command}` | {fmt_seconds(r.median_seconds)}"
            f" | **{reference.median_seconds / r.median_seconds:.2f}×** | "
            f"{r.bytes / MB:,.1f} MB | {csv.bytes / r.bytes:.1f}× | {first} | "
            f"{fmt_bytes(r.peak_rss)} |")
    return rows


def main(argv: list[str]) -> None:
    args = arguments("bench.arrow", __doc__).parse_args(argv)
    plan = plan_of(args, "arrow", rows=2_000_000, quick_rows=20_000, rounds=3,
                   quick_rounds=2)
    started = time.monotonic()
    with database(plan, log) as url, exporter_service(plan, url, "arrow") as server:
        server.start("/healthz")
        contenders = [psql_contender(url), exporter_contender(server, "csv"),
                      exporter_contender(server, "parquet"),
                      exporter_contender(server, "arrow"), duckdb_contender(url, plan.work)]
        log(f"{plan.repetitions} interleaved rounds")
        results = interleaved(contenders, plan.repetitions, log)
    reference, csv = results[0], results[1]
    parquet, duckdb = results[2], results[4]
    command = " ".join([".venv/bin/python -m bench.arrow", *argv])
    print("\n".join([
        f"{measured_by(command, started)}: {plan.demo_rows:,} demo rows, "
        f"{plan.repetitions} interleaved rounds, median; peak RSS of the exporter's server"
        " process (sampled) for its contenders, of psql or DuckDB's own process for theirs.",
        "",
        *table(results, reference, csv),
        "",
        f"Parquet at **{reference.median_seconds / parquet.median_seconds:.2f}×** psql's CSV"
        f" time (goal 0.8×), **{duckdb.median_seconds / parquet.median_seconds:.2f}×**"
        f" DuckDB's (goal 1×), **{csv.bytes / parquet.bytes:.1f}×** smaller than the CSV"
        f" (goal 3×); server peak RSS of `.parquet` {fmt_bytes(parquet.peak_rss)} and of"
        f" `.arrow` {fmt_bytes(results[3].peak_rss)} against {fmt_bytes(csv.peak_rss)} for"
        " `.csv` (goal: within 150 MiB).",
    ]))


if __name__ == "__main__":
    main(sys.argv[1:])
