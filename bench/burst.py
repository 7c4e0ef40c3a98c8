"""Issue 24's goals for the file hot path, side by side in one run:

- a burst of 1,000 connections at once for one 64 MiB file, each a 1 MiB Range with one
  admin token (its per-principal cap raised), the default pool and connection cap (512):
  how many were admitted, how many of those got their 206 with the right bytes (checked
  against the file), what the others got, and the server's peak RSS; nginx (one worker)
  under the same burst;
- 100 concurrent 10 MiB ranges (`curl -r`, each with the token): the exporter against
  nginx with one worker, nginx in front of the exporter with X-Accel-Redirect against
  nginx direct, and `exporter serve --workers 2` against one worker, with each one's CPU
  seconds per GiB served (psutil, from /proc): whether a second worker does the same work
  per byte, projected to a machine where each worker has a core and the clients are
  elsewhere (the 2-core machine cannot show the 1.6x goal: clients and servers share it).

    .venv/bin/python -m bench.burst [--rounds N] [--quick] [--database-url URL]

Without a URL, the embedded PostgreSQL under var/bench-burst/ (kept between runs).
`--quick` is the same code on small numbers (tests/test_bench.py runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import mmap
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.database import database
from bench.files import FILE_NAME, check_exporter_files, make_file, ranges, warm
from bench.harness import (
    ROOT,
    Contender,
    MiB,
    Plan,
    Result,
    RssSampler,
    Run,
    Service,
    curls_at_once,
    fmt_bytes,
    free_port,
    interleaved,
    machine,
    results_table,
)
from bench.throughput import CPU, accel_proxy, cpu_table, file_servers, new_token, with_cpu


@dataclasses.dataclass(frozen=True)
class Burst:
    connections: int
    file_size: int
    range_size: int
    max_connections: int  # EXPORTER_MAX_CONNECTIONS (uvicorn answers 503 beyond it)


FULL = Burst(1000, 64 * MiB, 1 * MiB, 512)
QUICK = Burst(60, 8 * MiB, 256 * 1024, 32)
GiB = 1024 * MiB
# The goals.
ADMITTED_OK = 480 / 512
MAX_RSS = 300 * 1000 * 1000
VS_NGINX, VS_NGINX_ACCEL, TWO_WORKERS = 0.8, 0.95, 1.6
# Seconds over which the second burst's connections start (a tool spawning clients).
SPREAD = 1.0


def log(message: str) -> None:
    print(message, flush=True)


@dataclasses.dataclass
class Outcome:
    """What each connection of a burst got."""

    answers: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    right: int = 0  # 206 with exactly the bytes of its range
    seconds: float = 0.0
    peak_rss: int = 0

    @property
    def admitted(self) -> int:
        """Answered by the application: not uvicorn's (or nginx's) connection cap, and
        not a connection that failed."""
        return sum(n for what, n in self.answers.items()
                   if not what.startswith(("cap:", "error:")))


async def _one(port: int, path: str, token: str, first: int, last: int, file: mmap.mmap,
               outcome: Outcome, delay: float) -> None:
    await asyncio.sleep(delay)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        outcome.answers[f"error: {type(error).__name__}"] += 1
        return
    try:
        writer.write((f"GET {path} HTTP/1.1\r\nHost: bench\r\nRange: bytes={first}-{last}\r\n"
                      f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 206:
            body = await reader.read()
            # uvicorn's own refusal over its cap is plain text, the app's answers are JSON.
            cap = status == 503 and not body.startswith(b"{")
            reason = body.decode(errors="replace")[:80] if not cap else "connection cap"
            outcome.answers[f"{'cap' if cap else status}: {reason}"] += 1
            return
        offset, good = first, True
        while chunk := await reader.read(256 * 1024):
            good = good and chunk == file[offset:offset + len(chunk)]
            offset += len(chunk)
        right = good and offset == last + 1
        outcome.answers["206" if right else "206 with wrong bytes"] += 1
        outcome.right += right
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
        outcome.answers[f"error: {type(error).__name__}"] += 1
    finally:
        writer.close()


def burst(server: Service, path: str, token: str, plan: Burst, file: Path,
          spread: float = 0.0) -> Outcome:
    """`plan.connections` connections, each one Range of `plan.range_size`: all at once,
    or their starts spread evenly over `spread` seconds."""
    span = plan.file_size - plan.range_size
    step = max(span // max(plan.connections - 1, 1), 1)
    outcome = Outcome()

    async def go() -> None:
        with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            await asyncio.gather(*(
                _one(server.port, path, token, (i * step) % (span + 1),
                     (i * step) % (span + 1) + plan.range_size - 1, mm, outcome,
                     spread * i / plan.connections)
                for i in range(plan.connections)))

    with RssSampler(server.pid, interval=0.02) as rss:
        started = time.monotonic()
        asyncio.run(go())
        outcome.seconds = time.monotonic() - started
    outcome.peak_rss = rss.peak
    return outcome


def burst_lines(name: str, plan: Burst, o: Outcome) -> list[str]:
    lines = [f"**{name}**: {plan.connections} connections in {o.seconds:.1f} s;"
             f" {o.admitted} admitted, {o.right} of them got their 206 with the right bytes;"
             f" server peak RSS {o.peak_rss / 1e6:,.0f} MB", ""]
    lines += [f"- {n} × {what}" for what, n in o.answers.most_common()]
    return [*lines, ""]


def ranges_with_token(name: str, server: Service, plan: Plan, token: str | None,
                      reference: bool = False) -> Contender:
    """`range_clients` curl processes at once, each one Range (with the token, if any)."""
    url = f"{server.url}/files/{FILE_NAME}"
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []

    def run() -> Run:
        seconds, outputs = curls_at_once([[*auth, "-r", f"{a}-{b}", url]
                                          for a, b in ranges(plan)])
        bad = [o for o in outputs if o != [str(plan.range_size), "206"]]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} range downloads went wrong: {bad[:3]}")
        return Run(seconds, plan.range_size * plan.range_clients)

    command = (f"{plan.range_clients} × curl {'-H Authorization ' if token else ''}-r a-b"
               f" '/files/{FILE_NAME}' ({fmt_bytes(plan.range_size)} each)")
    return Contender(name, command, run, server_pid=lambda: server.pid, reference=reference)


BARE = "nginx -> a bare app (X-Accel-Redirect)"
BARE_FASTAPI = "nginx -> a bare FastAPI app (X-Accel-Redirect)"


def bare_accel_app(plan: Plan, app: str = "app") -> Service:
    """An app of bench/accel_app.py under uvicorn, one worker, as `exporter serve` runs."""
    port = free_port()
    return Service(f"accel-{app}", [sys.executable, "-m", "uvicorn", f"bench.accel_app:{app}",
                                     "--port", str(port), "--no-access-log", "--log-level",
                                     "warning"], plan.logs / f"accel-{app}.log", port=port)


def cpu_per_gib(name: str, bytes_per_run: int) -> float | None:
    """The server's CPU seconds (its processes, from /proc) per GiB it served, over the
    runs of `name` so far; None if they were not measured."""
    values = CPU.get(name)
    if not values:
        return None
    return statistics.median(values) / (bytes_per_run / GiB)


def workers_projection(one: float | None, two: float | None) -> list[str]:
    """What `--workers 2` would give where each worker had a core of its own and the
    clients ran elsewhere: the 2-core machine cannot show it (clients and servers share
    the cores), but the work per byte says whether a second worker adds a bottleneck."""
    if one is None or two is None:
        return ["- `--workers 2` projected: not measured (--quick)"]
    projected = 2 * one / two
    return [f"- server CPU per GiB served: one worker {one:.2f} s, `--workers 2` {two:.2f} s"
            f" ({two / one:.2f}x the work per byte); with a core per worker and the"
            f" clients elsewhere, two workers would move {projected:.2f}x one worker's"
            f" bytes per second (goal {TWO_WORKERS}x: {_goal(projected, TWO_WORKERS)},"
            " a projection: it assumes one worker is bound by its core)"]


def _goal(value: float, goal: float, higher: bool = True) -> str:
    met = value >= goal if higher else value <= goal
    return "met" if met else "**not met**"


@contextmanager
def _database(plan: Plan, url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with database(plan, log) as own:
        yield own


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.burst", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small numbers (the test)")
    parser.add_argument("--database-url", help="a migrated database (else an embedded one)")
    parser.add_argument("--work", type=Path, help="where the file and logs go")
    parser.add_argument("--out", type=Path, help="write the report there too (markdown)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    base = Plan.make(args.quick, work=args.work or ROOT / "var" / "bench-burst",
                     out=args.work or ROOT / "var" / "bench-burst")
    plan = dataclasses.replace(
        base, repetitions=1 if args.quick else args.rounds, demo_rows=1000,
        generated_rows=1000,
        file_size=shape.file_size if args.quick else 1024 * MiB,
        range_clients=10 if args.quick else 100,
        range_size=256 * 1024 if args.quick else 10 * MiB)
    report = [f"Machine: {machine()}.", ""]
    root = plan.work / "files"
    make_file(root / FILE_NAME, plan.file_size)
    burst_file = root / "burst.bin"
    make_file(burst_file, shape.file_size)
    warm(root / FILE_NAME)
    warm(burst_file)
    env = {"EXPORTER_FILES_ROOT": str(root),
           "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": str(2 * shape.connections),
           "EXPORTER_MAX_CONNECTIONS": str(shape.max_connections)}
    with _database(plan, args.database_url) as url, ExitStack() as stack:
        token = new_token(url, ["admin"])
        # Not in --quick (a test): `--workers 2` is two more processes to start, nothing
        # else to check.
        started = file_servers(stack, plan, url, root, env, two_workers=not args.quick)
        ref, one, two = started.ref, started.one, started.two
        accel, proxied = started.accel, started.proxied
        for s in (one, proxied) if two is None else (one, two, proxied):
            check_exporter_files(s, plan.file_size)
            # A whole download stores each file's digest, which range answers then carry.
            for name in (FILE_NAME, burst_file.name):
                subprocess.run(["curl", "-sS", "-o", "/dev/null", f"{s.url}/files/{name}"],
                               check=True)

        log(f"burst: {shape.connections} connections, {fmt_bytes(shape.range_size)} each")
        report += [f"## A burst of {shape.connections} connections for one"
                   f" {fmt_bytes(shape.file_size)} file", "",
                   f"Each connection one `Range` of {fmt_bytes(shape.range_size)} with an admin"
                   " token (its per-principal cap raised), the default pool (10 + 20),"
                   f" EXPORTER_MAX_CONNECTIONS"
                   f" {shape.max_connections}; bytes checked against the file.", ""]
        # A first download learns the token and the slots; the burst is the steady state.
        burst(one, f"/files/{burst_file.name}", token, dataclasses.replace(shape, connections=1),
              burst_file)
        path = f"/files/{burst_file.name}"
        ours = burst(one, path, token, shape, burst_file)
        at_cap = dataclasses.replace(shape, connections=shape.max_connections)
        capped = burst(one, path, token, at_cap, burst_file)
        spread = burst(one, path, token, shape, burst_file, SPREAD)
        theirs = burst(ref, path, token, shape, burst_file)
        report += burst_lines("exporter, all at once", shape, ours)
        report += burst_lines("exporter, as many as its connection cap, all at once", at_cap,
                              capped)
        report += burst_lines(f"exporter, their starts spread over {SPREAD:g} s", shape, spread)
        report += burst_lines("nginx (one worker), all at once", shape, theirs)
        report += ["uvicorn's cap (`limit_concurrency`) counts open connections: a request"
                   " that arrives while more than EXPORTER_MAX_CONNECTIONS are open gets its"
                   " 503, so how many are admitted depends on how fast the connections"
                   " come, not on what the app does with them.", ""]
        for label, o in (("all at once", ours), ("as many as the cap", capped),
                         ("spread", spread)):
            least = ADMITTED_OK * shape.max_connections
            report += [f"Goal ({label}): every admitted connection its 206 with the right"
                       f" bytes: {o.right} of {o.admitted} admitted,"
                       f" {_goal(o.right, o.admitted)}; at least"
                       f" {least:.0f} of {shape.max_connections} admitted with their 206:"
                       f" {_goal(o.right, least)};"
                       f" server RSS at most 300 MB: {o.peak_rss / 1e6:,.0f} MB,"
                       f" {_goal(o.peak_rss, MAX_RSS, higher=False)}.", ""]

        log(f"{plan.range_clients} concurrent range clients")
        contenders = [ranges_with_token("nginx (sendfile, one worker)", ref, plan, None,
                                        reference=True),
                      ranges_with_token("exporter", one, plan, token),
                      ranges_with_token("nginx -> exporter (X-Accel-Redirect)", proxied, plan,
                                        token)]
        apps: dict[str, Service] = {}
        if two is not None:
            contenders.append(ranges_with_token("exporter --workers 2", two, plan, token))
            # Not in --quick either: what any app behind nginx gets at best, here, and an
            # app on the exporter's framework that does nothing else.
            for name, app in ((BARE, "app"), (BARE_FASTAPI, "fastapi_app")):
                apps[name] = stack.enter_context(bare_accel_app(plan, app)).start("/healthz")
                contenders.append(ranges_with_token(
                    name, stack.enter_context(accel_proxy(plan, root, apps[name])), plan,
                    None))
        # nginx's CPU with that of the app behind it.
        timed = [with_cpu(c, apps.get(c.name, accel)) if "Accel" in c.name else with_cpu(c)
                 for c in contenders]
        results = interleaved(timed, plan.repetitions, log)
        by_name: dict[str, Result] = {r.contender.name: r for r in results}
        nginx_r, one_r = by_name["nginx (sendfile, one worker)"], by_name["exporter"]
        two_r = by_name.get("exporter --workers 2")
        accel_r = by_name["nginx -> exporter (X-Accel-Redirect)"]
        vs_nginx = nginx_r.median_seconds / one_r.median_seconds
        vs_accel = nginx_r.median_seconds / accel_r.median_seconds
        workers = None if two_r is None else one_r.median_seconds / two_r.median_seconds
        served = plan.range_size * plan.range_clients
        # Before cpu_table(), which empties CPU.
        projection = workers_projection(cpu_per_gib("exporter", served),
                                        cpu_per_gib("exporter --workers 2", served))
        report += [f"## {plan.range_clients} concurrent ranges of {fmt_bytes(plan.range_size)}",
                   "", *results_table(results, nginx_r), "", *cpu_table(), "",
                   f"- exporter against nginx (one worker): {vs_nginx:.2f}x (goal"
                   f" {VS_NGINX}x: {_goal(vs_nginx, VS_NGINX)})",
                   f"- through nginx with X-Accel-Redirect against nginx direct:"
                   f" {vs_accel:.2f}x (goal {VS_NGINX_ACCEL}x:"
                   f" {_goal(vs_accel, VS_NGINX_ACCEL)})" + (
                       "" if BARE not in by_name else
                       f"; an app that only answers the header (bench/accel_app.py):"
                       f" {nginx_r.median_seconds / by_name[BARE].median_seconds:.2f}x,"
                       f" the same on FastAPI:"
                       f" {nginx_r.median_seconds / by_name[BARE_FASTAPI].median_seconds:.2f}x"),
                   "- `--workers 2` against one worker: " + (
                       "not measured (--quick)" if workers is None else
                       f"{workers:.2f}x (goal {TWO_WORKERS}x where the clients are not the"
                       f" limit: {_goal(workers, TWO_WORKERS)})"),
                   *projection, ""]
    text = "\n".join(report)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
