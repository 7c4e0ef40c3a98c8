"""Issue 25's goals side by side: exports against psql, with 1, 2 and 4 ranges.

    .venv/bin/python -m bench.parallel [--quick] [--rows N] [--rounds N] [--work DIR]
        [--parallel 1,2,4] [--memory-rows N] [--database-url URL] [--env KEY=VALUE]

The demo table (`exports.orders`, N rows; default 2,000,000, `--quick` 20,000) in the
benchmark's embedded PostgreSQL (var/bench-parallel/, kept between runs; or the database
of --database-url as it is), one `exporter serve` for each value of
EXPORTER_EXPORT_PARALLEL (its environment; a server that does not know the setting reads
every export with one COPY), all contenders in interleaved rounds, median:

- the whole table as CSV against psql's `\\copy` of `SELECT *`;
- NDJSON and the JSON array against psql's `\\copy` of `row_to_json` (NDJSON's COPY);
- a filtered export, a condition on an unindexed column that keeps about 10 % of the rows
  (`amount < 1000.01`), against psql's `\\copy` of the same SELECT.

Every download is checked to be exactly as long as psql's output of the same query. For
each contender the CPU seconds of each process: the server (all its threads), PostgreSQL
(all of the cluster's processes, backends that ended included) and the client (curl or
psql). With --memory-rows (default 10,000,000; `--quick`: not measured), the peak RSS
(VmHWM) of a fresh server exporting a table of that many rows against one of 10,000 rows,
for each setting. Prints markdown.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.database import database, execute, fetch
from bench.exports import (
    Query,
    curl_contender,
    exporter_service,
    peak_rss_hwm,
    psql_bytes,
    psql_contender,
    queries,
)
from bench.harness import (
    MB,
    Contender,
    CpuMeter,
    Plan,
    Result,
    Service,
    arguments,
    curl,
    fmt_bytes,
    fmt_seconds,
    interleaved,
    log,
    measured_by,
    plan_of,
    postmaster_pid,
    with_cpu,
)

SETTING = "EXPORTER_EXPORT_PARALLEL"
# About 10 % of the demo rows (amount is uniform over 0.01-10,000.00); no index on it.
FILTER = ("amount < 1000.01", "amount=lt.1000.01")
CSV = "WITH (FORMAT csv, HEADER)"
PROCESSES = ("server", "postgres", "client")
# The small table of the memory comparison, and the goals of issue 25 (times psql).
SMALL_ROWS = 10_000
GOALS = {"csv": 1.4, "ndjson": 1.3, "json": 1.3, "filtered": 1.2}


@dataclass(frozen=True)
class Shape:
    """One export of the goals: its psql reference and its path on the exporter."""

    key: str
    title: str
    reference: Query
    path: str
    size: int  # bytes of the exporter's answer


def shapes(plan: Plan, url: str, rows: int) -> list[Shape]:
    found = queries(plan)
    select = f"SELECT * FROM exports.orders WHERE {FILTER[0]}"
    filtered = Query("filtered", f"\\copy ({select}) TO STDOUT {CSV}",
                     f"/datasets/orders.csv?{FILTER[1]}")
    log("measuring psql's output sizes (and warming the cache)")
    sizes = {q.name: psql_bytes(url, q.copy) for q in (found["csv"], found["ndjson"], filtered)}
    # The array: `[`, json_agg's `, \n ` in place of each line break but the last, `]`.
    array = sizes["ndjson"] + 3 * rows - 2 if rows else 2
    return [
        Shape("csv", "whole table, CSV", found["csv"], found["csv"].path, sizes["csv"]),
        Shape("ndjson", "NDJSON", found["ndjson"], found["ndjson"].path, sizes["ndjson"]),
        Shape("json", "JSON array", found["ndjson"], "/datasets/orders.json", array),
        Shape("filtered", f"filtered (`{FILTER[0]}`), CSV", filtered, filtered.path,
              sizes["filtered"]),
    ]


@contextlib.contextmanager
def servers(plan: Plan, url: str, settings: Sequence[int], env: dict[str, str]
            ) -> Iterator[dict[int, Service]]:
    """One server per setting, started at once (each start is a Python's imports)."""
    with contextlib.ExitStack() as stack:
        started = {n: stack.enter_context(exporter_service(
            plan, url, f"parallel-{n}", {SETTING: str(n), **env})) for n in settings}
        for server in started.values():
            server.spawn()
        for server in started.values():
            server.wait_ready("/healthz", 120)
        yield started


def contenders(shapes: list[Shape], started: dict[int, Service], url: str
               ) -> list[Contender]:
    found: list[Contender] = []
    references: set[str] = set()
    for shape in shapes:
        if shape.reference.name not in references:  # NDJSON and JSON share theirs
            references.add(shape.reference.name)
            found.append(psql_contender(f"psql {shape.reference.name}", url,
                                        shape.reference, shape.size))
        found += [curl_contender(f"{shape.key}, {SETTING}={n}", server, shape.path,
                                 shape.size) for n, server in started.items()]
    return found


def _ratio(reference: Result, result: Result) -> str:
    return f"**{reference.median_seconds / result.median_seconds:.2f}×**"


def goals_table(shapes: list[Shape], by_name: dict[str, Result], settings: Sequence[int]
                ) -> list[str]:
    head = " | ".join(f"`{SETTING}={n}`" for n in settings)
    lines = [f"| export | psql (reference) | {head} | goal |",
             "|---|---|" + "---|" * len(settings) + "---|"]
    for shape in shapes:
        reference = by_name[f"psql {shape.reference.name}"]
        cells = [f"{_ratio(reference, r)} ({fmt_seconds(r.median_seconds)})" for r in
                 (by_name[f"{shape.key}, {SETTING}={n}"] for n in settings)]
        lines.append(f"| {shape.title} | {fmt_seconds(reference.median_seconds)} | "
                     f"{' | '.join(cells)} | {GOALS[shape.key]}× |")
    return lines


def _cpu(result: Result, process: str) -> str:
    seconds = result.cpu(process)
    return "–" if seconds is None else f"{seconds:.2f} s"


def cpu_table(results: list[Result]) -> list[str]:
    lines = ["| contender | median time | spread (min–max) | throughput | server CPU | "
             "PostgreSQL CPU | client CPU | all CPU | server peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        times = [x.seconds for x in r.runs]
        total = sum(c for p in PROCESSES if (c := r.cpu(p)) is not None)
        lines.append(
            f"| {r.contender.name} | {fmt_seconds(r.median_seconds)} | "
            f"{fmt_seconds(min(times))} – {fmt_seconds(max(times))} | "
            f"{r.throughput():,.0f} MB/s | "
            + " | ".join(_cpu(r, p) for p in PROCESSES)
            + f" | {total:.2f} s | {fmt_bytes(r.peak_rss) if r.peak_rss else '–'} |")
    return lines


def ensure_table(url: str, name: str, rows: int) -> None:
    """A table of generated rows (bench_generated's shape), kept between runs."""
    present = fetch(url, "SELECT to_regclass($1) IS NOT NULL AS present", f"exports.{name}")
    if present[0]["present"] and fetch(
            url, f"SELECT count(*) AS n FROM exports.{name}")[0]["n"] == rows:
        return
    log(f"loading {rows:,} rows into exports.{name}")
    execute(url, f"""
        DROP TABLE IF EXISTS exports.{name};
        CREATE TABLE exports.{name} AS
        SELECT i AS id, 'customer ' || (i % 1000) AS customer,
               round((i % 100000)::numeric / 100, 2) AS amount,
               timestamptz '2026-01-01 00:00:00+00' + i * interval '1 second' AS created_at,
               md5(i::text) AS note
        FROM generate_series(1::bigint, {int(rows)}::bigint) AS i""")
    execute(url, f"VACUUM ANALYZE exports.{name}")  # not in the CREATE's transaction


def memory_lines(plan: Plan, url: str, settings: Sequence[int], big_rows: int,
                 env: dict[str, str]) -> list[str]:
    """A fresh server per export, so its VmHWM is that export's peak and nothing else's."""
    tables = {SMALL_ROWS: "parallel_small", big_rows: "parallel_big"}
    for rows, name in tables.items():
        ensure_table(url, name, rows)
    lines = [f"| `{SETTING}` | idle | {SMALL_ROWS:,} rows | {big_rows:,} rows | "
             "large over small |", "|---|---|---|---|---|"]
    for n in settings:
        peaks: dict[int, int] = {}
        idle: list[int] = []
        for rows, name in tables.items():
            with exporter_service(plan, url, f"memory-{n}", {SETTING: str(n), **env}) as server:
                server.start("/healthz", 120)
                curl(server.url + "/datasets")  # the catalog read, as in real use
                idle.append(peak_rss_hwm(server.pid))
                r = curl(server.url + f"/datasets/{name}.csv")
                if r.status != 200:
                    raise RuntimeError(f"{name}: HTTP {r.status}")
                peaks[rows] = peak_rss_hwm(server.pid)
                log(f"  memory {SETTING}={n}, {rows:,} rows: {r.bytes / MB:,.0f} MB in "
                    f"{r.seconds:.1f} s, peak RSS {fmt_bytes(peaks[rows])}")
        lines.append(f"| {n} | {fmt_bytes(int(statistics.median(idle)))} | "
                     f"{fmt_bytes(peaks[SMALL_ROWS])} | {fmt_bytes(peaks[big_rows])} | "
                     f"**{peaks[big_rows] / peaks[SMALL_ROWS]:.3f}** |")
    return lines


def postmaster(url: str) -> int | None:
    """The PostgreSQL server's PID, if it runs on this machine and the role may read
    where (data_directory needs pg_read_all_settings)."""
    try:
        rows = fetch(url, "SELECT current_setting('data_directory') AS d")
    except asyncpg.PostgresError:
        return None
    return postmaster_pid(Path(rows[0]["d"]))


@contextlib.contextmanager
def the_database(plan: Plan, given: str | None) -> Iterator[str]:
    if given is not None:
        yield given
        return
    with database(plan, log) as url:
        yield url


def main(argv: list[str]) -> None:
    parser = arguments("bench.parallel", __doc__)
    parser.add_argument("--parallel", default="1,2,4",
                        help=f"values of {SETTING}, one server each (default 1,2,4)")
    parser.add_argument("--memory-rows", type=int,
                        help="rows of the large table of the memory comparison (default "
                        "10,000,000; 0, and with --quick: not measured)")
    parser.add_argument("--database-url",
                        help="an existing database whose exports.orders is used as it is")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every server (repeatable)")
    args = parser.parse_args(argv)
    plan = plan_of(args, "parallel", rows=2_000_000, quick_rows=20_000, rounds=3,
                   quick_rounds=1)
    settings = [int(n) for n in args.parallel.split(",")]
    memory_rows = args.memory_rows if args.memory_rows is not None else (
        0 if args.quick else 10_000_000)
    env = dict(item.split("=", 1) for item in args.env)
    started = time.monotonic()
    with the_database(plan, args.database_url) as url:
        rows = int(fetch(url, "SELECT count(*) AS n FROM exports.orders")[0]["n"])
        meter = CpuMeter(postmaster(url))
        found = shapes(plan, url, rows)
        with servers(plan, url, settings, env) as started_servers:
            runs = [with_cpu(c, meter) for c in contenders(found, started_servers, url)]
            log(f"{plan.repetitions} interleaved rounds of {len(runs)} contenders")
            results = interleaved(runs, plan.repetitions, log, warmup=not plan.quick)
        by_name = {r.contender.name: r for r in results}
        command = " ".join([".venv/bin/python -m bench.parallel", *argv])
        # Printed before the memory comparison, which loads a large table and takes a while.
        print("\n".join([
            f"{measured_by(command, started)}: {rows:,} rows of `exports.orders` "
            f"({found[0].size / MB:,.0f} MB of CSV, {found[1].size / MB:,.0f} MB of "
            f"NDJSON), {plan.repetitions} interleaved rounds, median. Each exporter contender"
            " against its psql reference (its median time over the contender's: above 1 is "
            "faster than psql), with the goal of issue 25:",
            "",
            *goals_table(found, by_name, settings),
            "",
            "The references: "
            + "; ".join(f"`psql -c \"{c}\"`" for c in dict.fromkeys(
                s.reference.copy for s in found))
            + ". The exporter's: `curl -o /dev/null` of "
            + ", ".join(f"`{s.path}`" for s in found) + ".",
            "",
            "CPU time of each process (median over the rounds):",
            "",
            *cpu_table(results),
        ]), flush=True)
        if memory_rows:
            print("\n".join([
                "", "Server peak RSS (VmHWM of a fresh server, one CSV export of a table "
                "of generated rows; idle: started and the catalog read):", "",
                *memory_lines(plan, url, settings, memory_rows, env)]))


if __name__ == "__main__":
    main(sys.argv[1:])
