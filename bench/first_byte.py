"""Time to the first byte of an export: this checkout against another, interleaved.

    .venv/bin/python -m bench.first_byte [--against DIR] [--rows N] [--rounds N]

One embedded PostgreSQL (var/bench-first-byte/, kept between runs) with the demo table
(`exports.orders`, N rows; default 100,000) and one `exporter serve` per checkout: this
one's and, with `--against`, the one at DIR (its `exporter` package imported first). Each
round runs real `curl` once per server and URL, in turn: the whole table and 10 rows.
Prints the medians (curl's `time_starttransfer`) as markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
from pathlib import Path

from bench.database import database
from bench.exports import exporter_service
from bench.harness import ROOT, Plan, Service, curl, fmt_seconds, machine

URLS = {"whole table": "/datasets/orders.csv", "10 rows": "/datasets/orders.csv?limit=10"}


def server_of(plan: Plan, url: str, name: str, checkout: Path | None) -> Service:
    service = exporter_service(plan, url, name)
    if checkout is not None:
        # `-m` would put this checkout first on sys.path: import the other one's instead.
        start = (f"import sys, runpy; sys.path.insert(0, {str(checkout)!r});"
                 " sys.argv[0] = 'exporter'; runpy.run_module('exporter.cli', run_name='__main__')")
        service.command = [sys.executable, "-c", start, *service.command[3:]]
    return service


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.first_byte", description=__doc__)
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    plan = dataclasses.replace(Plan.make(True, work=ROOT / "var" / "bench-first-byte"),
                               demo_rows=args.rows, generated_rows=1000)
    print(f"machine: {machine()}", file=sys.stderr)
    with database(plan, lambda line: print(line, file=sys.stderr)) as db:
        checkouts: dict[str, Path | None] = {"this checkout": None}
        if args.against is not None:
            checkouts[str(args.against)] = args.against.resolve()
        servers = {name: server_of(plan, db, f"first-byte-{i}", path)
                   for i, (name, path) in enumerate(checkouts.items())}
        times: dict[tuple[str, str], list[float]] = {}
        try:
            for s in servers.values():
                s.spawn()
                s.wait_ready("/healthz", 60)
            for s in servers.values():  # warm: the pools, the catalog, the link key
                for path in URLS.values():
                    curl(s.url + path)
            for _ in range(args.rounds):
                for name, s in servers.items():
                    for what, path in URLS.items():
                        result = curl(s.url + path)
                        if result.status != 200:  # a quick error is no first byte
                            raise RuntimeError(f"{name}: {path} answered {result.status}")
                        times.setdefault((name, what), []).append(result.first_byte)
        finally:
            for s in servers.values():
                s.stop()
            # Every whole-table export kept a copy for resuming: gigabytes after a run.
            shutil.rmtree(plan.work / "exports", ignore_errors=True)
    print(f"| server | {' | '.join(URLS)} |")
    print(f"|---|{'---|' * len(URLS)}")
    for name in servers:
        cells = [fmt_seconds(statistics.median(times[(name, what)])) for what in URLS]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
