"""Many requests at once: 100 concurrent file ranges and 20 concurrent exports, with
one worker process and with `exporter serve --workers 2`, against nginx.

Not part of `./scripts/bench` (its results go below the kept marker of
docs/benchmarks.md). Run: `.venv/bin/python -m bench.throughput [--rounds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import secrets
import subprocess
import sys
import time
from contextlib import ExitStack

from bench.database import database, fetch
from bench.exports import exporter_service
from bench.files import (
    FILE_NAME,
    concurrent,
    exporter_has_files,
    make_file,
    nginx,
    ranges,
    warm,
)
from bench.harness import (
    MB,
    ROOT,
    Contender,
    MiB,
    Plan,
    Run,
    Service,
    interleaved,
    machine,
    results_table,
)
from exporter.access.tokens import TokenStore
from exporter.config import Settings
from exporter.db import create_engine


def log(message: str) -> None:
    print(message, flush=True)


def exports_at_once(name: str, server: Service, n: int, expect: int) -> Contender:
    """`n` curl processes at once, each the whole `orders.csv`; wall time to the last."""

    def run() -> Run:
        start = time.monotonic()
        procs = [subprocess.Popen(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{http_code}",
             server.url + "/datasets/orders.csv"], stdout=subprocess.PIPE, text=True)
            for _ in range(n)]
        outputs = [p.communicate()[0].split() for p in procs]
        seconds = time.monotonic() - start
        bad = [o for o in outputs if o != [str(expect), "200"]]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} exports went wrong: {bad[:3]}")
        return Run(seconds, expect * n)

    return Contender(name, f"{n} × curl '/datasets/orders.csv'", run,
                     server_pid=lambda: server.pid)


def ranges_at_once(name: str, server: Service, plan: Plan, token: str) -> Contender:
    """As bench.files.concurrent, each request with `Authorization: Bearer` (a token
    looked up in the database on every request)."""
    url = f"{server.url}/files/{FILE_NAME}"

    def run() -> Run:
        start = time.monotonic()
        procs = [subprocess.Popen(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{http_code}",
             "-H", f"Authorization: Bearer {token}", "-r", f"{a}-{b}", url],
            stdout=subprocess.PIPE, text=True) for a, b in ranges(plan)]
        outputs = [p.communicate()[0].split() for p in procs]
        seconds = time.monotonic() - start
        bad = [o for o in outputs if o != [str(plan.range_size), "206"]]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} range downloads went wrong: {bad[:3]}")
        return Run(seconds, plan.range_size * plan.range_clients)

    return Contender(name, f"{plan.range_clients} × curl -H 'Authorization: Bearer ...' "
                     f"-r a-b '/files/{FILE_NAME}'", run, server_pid=lambda: server.pid)


def new_token(url: str) -> str:
    async def go() -> str:
        engine = create_engine(Settings(database_url=url), url)
        try:
            return await TokenStore(engine).create(f"bench-{secrets.token_hex(4)}",
                                                   ["files:*"], None)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.throughput", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of exports.orders")
    parser.add_argument("--only", choices=["files", "exports"], action="append")
    args = parser.parse_args(argv)
    only = set(args.only or ["files", "exports"])
    base = Plan.make(False, work=ROOT / "var" / "bench-throughput",
                     out=ROOT / "var" / "bench-throughput")
    plan = dataclasses.replace(base, repetitions=args.rounds, demo_rows=args.rows,
                               generated_rows=10_000, file_size=1024 * MiB)
    log(f"machine: {machine()}")
    root = plan.work / "files"
    make_file(root / FILE_NAME, plan.file_size)
    warm(root / FILE_NAME)
    env = {"EXPORTER_FILES_ROOT": str(root)}
    with database(plan, log) as url, ExitStack() as stack:
        ref = stack.enter_context(nginx(plan, root))
        one = stack.enter_context(exporter_service(plan, url, "exporter-1", env)).start("/healthz")
        two = stack.enter_context(exporter_service(plan, url, "exporter-2", env))
        two.command = [*two.command, "--workers", "2"]
        two.start("/healthz")
        for s in (one, two):
            assert exporter_has_files(s, plan.file_size)
            # As in ./scripts/bench, whose single-download section runs first: a whole
            # download stores the file's digest, which the range answers then carry.
            subprocess.run(["curl", "-sS", "-o", "/dev/null", f"{s.url}/files/{FILE_NAME}"],
                           check=True)
        if "files" in only:
            log(f"{plan.range_clients} concurrent range clients")
            token = new_token(url)
            results = interleaved([concurrent("nginx (sendfile)", ref, plan, reference=True),
                                   concurrent("exporter", one, plan),
                                   ranges_at_once("exporter, with a token", one, plan, token),
                                   concurrent("exporter --workers 2", two, plan)],
                                  plan.repetitions, log)
            print("\n".join(results_table(results, results[0])))
        if "exports" in only:
            expect = len(subprocess.run(["curl", "-sS", one.url + "/datasets/orders.csv"],
                                        capture_output=True, check=True).stdout)
            rows = fetch(url, "SELECT count(*) AS n FROM exports.orders")[0]["n"]
            log(f"20 concurrent exports of {rows:,} rows ({expect / MB:,.0f} MB each)")
            results = interleaved([exports_at_once("exporter", one, 20, expect),
                                   exports_at_once("exporter --workers 2", two, 20, expect)],
                                  plan.repetitions, log)
            print("\n".join(results_table(results, results[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
