"""What `?since=<cursor>` costs: a sequential scan, against the plain filtered export.

    .venv/bin/python -m bench.cursor [--quick] [--rows N] [--rounds N] [--changed N]

The demo table (`exports.orders`, N rows; default 2,000,000, `--quick` 100,000) in the
benchmark's embedded PostgreSQL (var/bench-cursor/, kept between runs). A full export
gives a cursor; then N rows (default 100) are updated. Interleaved rounds of real `curl`
runs against one `exporter serve`: the export `since` that cursor (the N changed rows),
the plain export with a filter on an unindexed column that finds the same N rows (the
same sequential scan without the cursor's condition), and the indexed `updated_at=gte.`
filter (the old recipe, which loses late commits); psql `\\copy` of the exporter's own
`since` SELECT as the reference. Prints markdown with the server's peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import httpx

from bench.database import database, execute, fetch
from bench.exports import Query, exporter_service, psql_bytes, psql_contender
from bench.harness import (
    ROOT,
    Contender,
    Plan,
    Run,
    Service,
    curl,
    fmt_bytes,
    fmt_seconds,
    interleaved,
    machine,
)
from exporter.exports import cursor

SECRET = "bench-cursor-link-secret"
MARK = "bench-cursor changed"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def contender(name: str, server: Service, path: str, rows: int) -> Contender:
    def run() -> Run:
        r = curl(server.url + path)
        if r.status != 200:
            raise RuntimeError(f"{name}: HTTP {r.status}")
        return Run(r.seconds, r.bytes, first_byte=r.first_byte)

    # One check before the timed runs: the same rows each time.
    lines = httpx.get(server.url + path, timeout=600).content.count(b"\n") - 1
    if lines != rows:
        raise RuntimeError(f"{name}: {lines} rows, expected {rows}")
    return Contender(name, f"curl -o /dev/null '{path}'", run, server_pid=lambda: server.pid)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.cursor", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--changed", type=int, default=100)
    parser.add_argument("--work", type=Path, help="where the database is kept"
                        " (default var/bench-cursor; about 1.5 GB for 2,000,000 rows)")
    args = parser.parse_args(argv)
    work = args.work or ROOT / "var" / ("bench-cursor-quick" if args.quick else "bench-cursor")
    plan = dataclasses.replace(
        Plan.make(args.quick, out=work, work=work),
        demo_rows=args.rows or (100_000 if args.quick else 2_000_000),
        generated_rows=1000, repetitions=args.rounds or (2 if args.quick else 7))
    changed = args.changed
    with (database(plan, log) as url,
          exporter_service(plan, url, "cursor", {"EXPORTER_LINK_SECRET": SECRET,
                                                 "EXPORTER_EXPORTS_RESUME": "false"})
          as server):
        server.start("/healthz")
        # Earlier runs' marks go, so the filter finds this run's rows only.
        execute(url, f"UPDATE exports.orders SET note = NULL, updated_at = created_at"
                     f" WHERE note = '{MARK}'")
        head = httpx.get(server.url + "/datasets/orders.csv?limit=0", timeout=60)
        token = head.headers[cursor.HEADER]
        # The demo's updated_at runs into the future: the changed rows get later ones.
        before = "2100-01-01T00:00:00Z"
        step = plan.demo_rows // changed
        execute(url, f"UPDATE exports.orders SET note = '{MARK}',"
                     f" updated_at = '{before}'::timestamptz + id * interval '1 second'"
                     f" WHERE id % {step} = 0 AND id <= {step * changed}")
        rows = int(fetch(url, f"SELECT count(*) AS n FROM exports.orders"
                              f" WHERE note = '{MARK}'")[0]["n"])
        execute(url, "VACUUM ANALYZE exports.orders")
        since = cursor.decode(token, cursor.cursor_key(SECRET.encode()))
        # As the export's transaction does: age() counts from the next xid, which stays
        # put while nothing else writes.
        reference = int(fetch(url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
                                   " + age(xid(pg_snapshot_xmax(pg_current_snapshot()))) AS r"
                              )[0]["r"])
        select = f"SELECT * FROM exports.orders WHERE {cursor.condition(since, reference)}"
        query = Query("since", f"\\copy ({select}) TO STDOUT WITH (FORMAT csv, HEADER)",
                      f"/datasets/orders.csv?since={token}")
        size = psql_bytes(url, query.copy)
        contenders = [
            psql_contender("psql `\\copy` of the same SELECT (xmin condition)", url, query,
                           size),
            contender("exporter `?since=<cursor>`", server, query.path, rows),
            contender("exporter `?note=eq.<mark>` (unindexed: a sequential scan)", server,
                      f"/datasets/orders.csv?note=eq.{MARK.replace(' ', '%20')}", rows),
            contender("exporter `?updated_at=gte.<time>` (indexed; loses late commits)",
                      server, f"/datasets/orders.csv?updated_at=gte.{before}", rows),
        ]
        log(f"{plan.repetitions} interleaved rounds")
        results = interleaved(contenders, plan.repetitions, log)
        mine = fetch(url, "SELECT pg_size_pretty(pg_table_size('exports.orders')) AS s")[0]["s"]
    psql = results[0]
    lines = [
        f"### Change cursor: `since` on {plan.demo_rows:,} rows with {rows} changed "
        f"(table {mine})", "",
        f"`.venv/bin/python -m bench.cursor{' --quick' if args.quick else ''}` "
        f"({machine()}), {plan.repetitions} interleaved rounds; the cursor is "
        f"{len(token)} characters.", "",
        "| contender | median time | vs psql | server peak RSS |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.contender.name} | {fmt_seconds(r.median_seconds)} | "
                     f"{r.median_seconds / psql.median_seconds:.2f}× | "
                     f"{fmt_bytes(r.peak_rss) if r.peak_rss else '—'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
