"""Time to the first byte of an export: this checkout against another, interleaved.

    .venv/bin/python -m bench.first_byte [--against DIR] [--rows N] [--rounds N]

One embedded PostgreSQL (var/bench-first-byte/, kept between runs) with the demo table
(`exports.orders`, N rows; default 100,000) and one `exporter serve` per checkout: this
one's and, with `--against`, the one at DIR (its `exporter` package imported first). Each
checkout gets a database of its own, a copy of the demo's made afresh each run, which its
server migrates to its own head (checkouts of different schema versions side by side),
and its own folder of stored exports. Each round runs real `curl` once per server and
URL, in turn: the whole table and 10 rows. Prints the medians (curl's
`time_starttransfer`) as markdown, and each checkout's ratio to the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from bench.database import database, execute
from bench.exports import exporter_service
from bench.harness import ROOT, Plan, Service, curl, fmt_seconds, machine

URLS = {"whole table": "/datasets/orders.csv", "10 rows": "/datasets/orders.csv?limit=10"}


def server_of(plan: Plan, url: str, name: str, checkout: Path | None) -> Service:
    # Its own stored exports: each server's clean-up removes files its database does not name.
    service = exporter_service(plan, url, name,
                               {"EXPORTER_EXPORTS_DIR": str(plan.work / f"exports-{name}")})
    if checkout is not None:
        # `-m` would put this checkout first on sys.path: import the other one's instead.
        start = (f"import sys, runpy; sys.path.insert(0, {str(checkout)!r});"
                 " sys.argv[0] = 'exporter'; runpy.run_module('exporter.cli', run_name='__main__')")
        service.command = [sys.executable, "-c", start, *service.command[3:]]
    return service


def checkout_database(url: str, index: int) -> str:
    """A copy of the demo's database for one checkout, without the app's own schema: the
    checkout's `serve` migrates it to its head (an older checkout's migrations stop before
    this one's)."""
    name = f"first_byte_{index}"
    execute(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    template = make_url(url).database or "postgres"
    execute(url, f'CREATE DATABASE {name} TEMPLATE "{template}"')
    own = make_url(url).set(database=name).render_as_string(hide_password=False)
    execute(own, "DROP SCHEMA IF EXISTS exporter CASCADE")
    return own


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
        # Made before any server connects: CREATE DATABASE copies an idle template.
        urls = [checkout_database(db, i) for i in range(len(checkouts))]
        servers = {name: server_of(plan, urls[i], f"first-byte-{i}", path)
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
            for s in servers.values():
                shutil.rmtree(s.env["EXPORTER_EXPORTS_DIR"], ignore_errors=True)
    medians = {key: statistics.median(values) for key, values in times.items()}
    first = next(iter(servers))
    print(f"| server | {' | '.join(URLS)} |")
    print(f"|---|{'---|' * len(URLS)}")
    for name in servers:
        cells = [fmt_seconds(medians[(name, what)]) for what in URLS]
        if name != first:
            cells = [f"{cell} ({medians[(name, what)] / medians[(first, what)]:.2f}x)"
                     for cell, what in zip(cells, URLS, strict=True)]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
