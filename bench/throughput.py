"""Many requests at once: 100 concurrent file ranges and 20 concurrent exports, with
one worker process and with `exporter serve --workers 2`, against nginx; for files also
nginx in front of an exporter with EXPORTER_FILES_ACCEL_REDIRECT (docs/deploy.md's
locations, plain http): the app checks and audits, nginx sends the bytes.

Not part of `./scripts/bench` (its results go below the kept marker of
docs/benchmarks.md). Run: `.venv/bin/python -m bench.throughput [--rounds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import secrets
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import psutil

from bench.database import database, fetch
from bench.exports import exporter_service
from bench.files import (
    FILE_NAME,
    check_exporter_files,
    concurrent,
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
    curls_at_once,
    interleaved,
    machine,
    results_table,
)
from exporter.access.tokens import TokenStore
from exporter.config import Settings
from exporter.db import create_engine


def log(message: str) -> None:
    print(message, flush=True)


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and its children (the workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


CPU: dict[str, list[float]] = {}


def with_cpu(c: Contender, *also: Service) -> Contender:
    """The same contender, noting the server's CPU seconds per run (with those of `also`,
    another server it uses): on a machine shared with other work, wall time moves with
    the load, CPU time much less."""
    assert c.server_pid is not None
    pids, inner = [c.server_pid, *(lambda s=s: s.pid for s in also)], c.run

    def cpu() -> float:
        return sum(tree_cpu(pid()) for pid in pids)

    def run() -> Run:
        before = cpu()
        result = inner()
        CPU.setdefault(c.name, []).append(cpu() - before)
        return result

    return dataclasses.replace(c, run=run)


def cpu_table() -> list[str]:
    rows = ["| contender | server CPU per run: median | min–max |", "|---|---|---|"]
    for name, values in CPU.items():
        rows.append(f"| {name} | {statistics.median(values):.2f} s | "
                    f"{min(values):.2f} s – {max(values):.2f} s |")
    CPU.clear()
    return rows


# docs/deploy.md's locations, on plain http and without its prefix: the app checks,
# audits and answers with X-Accel-Redirect; nginx sends the file.
ACCEL_UPSTREAM = "upstream exporter {{ server 127.0.0.1:{port}; keepalive 16; }}"
ACCEL_FILES = """location /files/ {{
            proxy_pass http://exporter;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
        }}
        location /internal/ {{
            internal;
            alias {root}/;
            disable_symlinks on from=$document_root;
            sendfile on;
            tcp_nopush on;
            max_ranges 16;
            add_header Content-Security-Policy $upstream_http_content_security_policy always;
            add_header X-Content-Type-Options $upstream_http_x_content_type_options always;
            add_header Repr-Digest $upstream_http_repr_digest always;
        }}"""


def accel_proxy(plan: Plan, root: Path, upstream: Service) -> contextlib.AbstractContextManager[
        Service]:
    """nginx in front of `upstream` (started with EXPORTER_FILES_ACCEL_REDIRECT)."""
    return nginx(plan, root, files=ACCEL_FILES.format(root=root),
                 http=ACCEL_UPSTREAM.format(port=upstream.port), name="nginx-accel")


@dataclasses.dataclass(frozen=True)
class FileServers:
    """What the files are measured on, started: nginx alone (the reference), the exporter
    with one worker and with two, and nginx in front of an exporter that answers with
    X-Accel-Redirect (`accel`, whose CPU counts with nginx's)."""

    ref: Service
    one: Service
    two: Service | None
    accel: Service
    proxied: Service


def file_servers(stack: ExitStack, plan: Plan, url: str, root: Path, env: dict[str, str],
                 *, two_workers: bool = True) -> FileServers:
    """Start them on `stack` (stopped when it closes), the exporters with `env`."""
    ref = stack.enter_context(nginx(plan, root))
    one = stack.enter_context(exporter_service(plan, url, "exporter-1", env)).start("/healthz")
    two = None
    if two_workers:
        two = stack.enter_context(exporter_service(plan, url, "exporter-2", env))
        two.command = [*two.command, "--workers", "2"]
        two.start("/healthz")
    accel = stack.enter_context(exporter_service(
        plan, url, "exporter-accel", {**env, "EXPORTER_FILES_ACCEL_REDIRECT": "/internal/"}))
    accel.start("/healthz")
    proxied = stack.enter_context(accel_proxy(plan, root, accel))
    return FileServers(ref, one, two, accel, proxied)


def baseline_service(plan: Plan, url: str, checkout: Path, env: dict[str, str],
                     workers: int) -> Service:
    """`exporter serve` from another checkout (the code before a change), measured in the
    same interleaved rounds as this one."""
    s = exporter_service(plan, url, f"baseline-{workers}", env)
    boot = (f"import sys; sys.path.insert(0, {str(checkout)!r}); "
            "from exporter.cli import main; main()")
    s.command = [sys.executable, "-c", boot, *s.command[3:]]
    if workers > 1:
        s.command += ["--workers", str(workers)]
    return s


def exports_at_once(name: str, server: Service, n: int, expect: int) -> Contender:
    """`n` curl processes at once, each the whole `orders.csv`; wall time to the last."""

    def run() -> Run:
        seconds, outputs = curls_at_once([[server.url + "/datasets/orders.csv"]] * n)
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
        seconds, outputs = curls_at_once(
            [["-H", f"Authorization: Bearer {token}", "-r", f"{a}-{b}", url]
             for a, b in ranges(plan)])
        bad = [o for o in outputs if o != [str(plan.range_size), "206"]]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} range downloads went wrong: {bad[:3]}")
        return Run(seconds, plan.range_size * plan.range_clients)

    return Contender(name, f"{plan.range_clients} × curl -H 'Authorization: Bearer ...' "
                     f"-r a-b '/files/{FILE_NAME}'", run, server_pid=lambda: server.pid)


def new_token(url: str, scopes: list[str] | None = None) -> str:
    async def go() -> str:
        engine = create_engine(Settings(database_url=url), url)
        try:
            return await TokenStore(engine).create(f"bench-{secrets.token_hex(4)}",
                                                   scopes or ["files:*"], None)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.throughput", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of exports.orders")
    parser.add_argument("--only", choices=["files", "exports"], action="append")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of the code before a change: its server runs too")
    parser.add_argument("--no-token", action="store_true")
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
        started = file_servers(stack, plan, url, root, env)
        ref, one, accel, proxied = started.ref, started.one, started.accel, started.proxied
        assert started.two is not None
        two = started.two
        servers = [one, two, proxied]
        old: Service | None = None
        if args.baseline is not None:
            old = stack.enter_context(baseline_service(plan, url, args.baseline, env, 1))
            old.start("/healthz")
            servers.append(old)
        for s in servers:
            check_exporter_files(s, plan.file_size)
            # As in ./scripts/bench, whose single-download section runs first: a whole
            # download stores the file's digest, which the range answers then carry.
            subprocess.run(["curl", "-sS", "-o", "/dev/null", f"{s.url}/files/{FILE_NAME}"],
                           check=True)
        if "files" in only:
            log(f"{plan.range_clients} concurrent range clients")
            through = concurrent("nginx -> exporter (X-Accel-Redirect)", proxied, plan)
            contenders = [concurrent("nginx (sendfile)", ref, plan, reference=True),
                          concurrent("exporter", one, plan),
                          concurrent("exporter --workers 2", two, plan),
                          through]
            if not args.no_token:
                contenders.append(ranges_at_once("exporter, with a token", one, plan,
                                                 new_token(url)))
            if old is not None:
                contenders.append(concurrent("exporter before the change", old, plan))
                if not args.no_token:
                    contenders.append(ranges_at_once("exporter before the change, with a token",
                                                     old, plan, new_token(url)))
            # Through nginx, the CPU is nginx's and its exporter's (the RSS, nginx's).
            timed = [with_cpu(c, accel) if c is through else with_cpu(c) for c in contenders]
            results = interleaved(timed, plan.repetitions, log)
            print("\n".join(results_table(results, results[0])))
            print("\n".join(cpu_table()))
        if "exports" in only:
            expect = len(subprocess.run(["curl", "-sS", one.url + "/datasets/orders.csv"],
                                        capture_output=True, check=True).stdout)
            rows = fetch(url, "SELECT count(*) AS n FROM exports.orders")[0]["n"]
            log(f"20 concurrent exports of {rows:,} rows ({expect / MB:,.0f} MB each)")
            contenders = [exports_at_once("exporter", one, 20, expect),
                          exports_at_once("exporter --workers 2", two, 20, expect)]
            if old is not None:
                contenders.append(exports_at_once("exporter before the change", old, 20,
                                                  expect))
            results = interleaved([with_cpu(c) for c in contenders], plan.repetitions, log)
            print("\n".join(results_table(results, results[0])))
            print("\n".join(cpu_table()))

if __name__ == "__main__":
    main(sys.argv[1:])
