"""What the bounds on request heads and connections cost (exporter/server/guard.py).

The same app under uvicorn's own httptools protocol with its defaults ("before") and
under `exporter serve`'s options ("after": the guarded protocol, the connection cap,
no forwarded headers believed), interleaved:
- requests per second over 8 kept-alive connections, with a short head, a browser-sized
  head (1.6 KB of cookies and user agent), and /healthz (one database round trip);
- the server's memory when 4 clients send 100 MB heads, and when 512 connections each
  hold an unfinished 60 KiB head (the worst case the bounds allow).

Run: .venv/bin/python -m bench.http_guard [--seconds 5] [--rounds 5] [--no-memory]
It prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from bench.database import database
from bench.harness import ROOT, Plan, RssSampler, Service, machine, now_utc, tree_rss

MB = 1_000_000
CONNECTIONS = 8
SHORT_HEAD = b"GET /no-such-page HTTP/1.1\r\nHost: bench\r\n\r\n"
BROWSER_HEAD = (
    b"GET /no-such-page HTTP/1.1\r\nHost: bench\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/131.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Cookie: " + b"; ".join(b"c%d=%s" % (i, b"v" * 60) for i in range(20)) + b"\r\n\r\n"
)
HEALTHZ_HEAD = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
CASES = {"short head (404)": SHORT_HEAD, "1.6 KB browser head (404)": BROWSER_HEAD,
         "/healthz (database)": HEALTHZ_HEAD}


def serve(port: int, guarded: bool) -> None:
    import uvicorn

    from exporter.cli import server_limits
    from exporter.config import Settings

    options = server_limits(Settings()) if guarded else {"http": "httptools"}
    uvicorn.run("exporter.app:create_app", factory=True, port=port, log_level="warning",
                access_log=False, **options)


def service(url: str, guarded: bool, logs: Path) -> Service:
    name = "after (guarded)" if guarded else "before (uvicorn defaults)"
    s = Service(name, [], logs / f"http-guard-{'after' if guarded else 'before'}.log",
                env={"EXPORTER_DATABASE_URL": url})
    s.command = [sys.executable, "-m", "bench.http_guard", "serve", "--port", str(s.port),
                 *(["--guarded"] if guarded else [])]
    return s


async def _client(port: int, head: bytes, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    try:
        while time.monotonic() < until:
            writer.write(head)
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in status_and_headers.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            n += 1
    finally:
        counts.append(n)
        writer.close()


def requests_per_second(port: int, pid: int, head: bytes,
                        seconds: float) -> tuple[float, float]:
    """Requests per second, and the server's CPU time per request in microseconds: on a
    shared machine the second is the steadier measure of what the server does."""
    async def go() -> tuple[float, float]:
        counts: list[int] = []
        server = psutil.Process(pid)
        cpu = sum(server.cpu_times()[:2])
        started = time.monotonic()
        await asyncio.gather(*(_client(port, head, started + seconds, counts)
                               for _ in range(CONNECTIONS)))
        n = sum(counts)
        used = sum(server.cpu_times()[:2]) - cpu
        return n / (time.monotonic() - started), used / n * 1e6

    return asyncio.run(go())


def big_heads(port: int, pid: int, clients: int = 4, size: int = 100 * MB,
              limit: float = 60) -> tuple[float, float]:
    """Peak RSS growth (MB) while `clients` send `size`-byte unfinished heads, and seconds."""
    head = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Big: " + b"a" * size

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(head)
            sock.recv(1024)  # the 431

    base = tree_rss(pid)
    started = time.monotonic()
    with RssSampler(pid) as rss:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=limit)
                 for _ in range(clients)]
        threads = [threading.Thread(target=send, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        deadline = started + limit
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        took = time.monotonic() - started
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread still blocked in it
            s.close()
        for t in threads:
            t.join()
    return (rss.peak - base) / MB, took


def held_heads(port: int, pid: int, n: int = 512, size: int = 60 * 1024) -> float:
    """RSS growth (MB) with `n` connections each holding an unfinished `size`-byte head."""
    base = tree_rss(pid)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Big: " + b"a" * size)
            socks.append(s)
        time.sleep(2)
        return (tree_rss(pid) - base) / MB
    finally:
        for s in socks:
            s.close()


def print_table(names: list[str], figures: dict[tuple[str, str], list[float]]) -> None:
    """A Markdown table: a row per case, the median (min–max) of each server, and the
    ratio of the second's median to the first's."""
    print("| request | " + " | ".join(names) + " | after / before |")
    print("|---|---|---|---|")
    for case in CASES:
        values = [figures[(n, case)] for n in names]
        medians = [statistics.median(v) for v in values]
        cells = [f"{m:,.0f} ({min(v):,.0f}–{max(v):,.0f})" for m, v in zip(medians, values,
                                                                         strict=True)]
        print(f"| {case} | " + " | ".join(cells) + f" | {medians[1] / medians[0]:.2f} |")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.http_guard", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("--port", type=int, required=True)
    serve_parser.add_argument("--guarded", action="store_true")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the memory attacks (the one before takes a minute)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.guarded)
        return

    plan = Plan.make(quick=True, work=ROOT / "var" / "bench-guard")
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    memory: dict[str, tuple[float, float, float]] = {}
    started = now_utc()
    with database(plan) as url:
        for round_ in range(args.rounds):
            order = [False, True] if round_ % 2 == 0 else [True, False]
            for guarded in order:
                with service(url, guarded, plan.logs) as s:
                    s.start("/healthz")
                    requests_per_second(s.port, s.pid, SHORT_HEAD, 1)  # warm up
                    for case, head in CASES.items():
                        rate, cpu = requests_per_second(s.port, s.pid, head, args.seconds)
                        rates.setdefault((s.name, case), []).append(rate)
                        cpus.setdefault((s.name, case), []).append(cpu)
                        print(f"{s.name:28} {case:28} {rate:8.0f} req/s {cpu:6.0f} µs CPU",
                              flush=True)
        for guarded in (True, False) if args.memory else ():
            with service(url, guarded, plan.logs) as s:
                s.start("/healthz")
                held = held_heads(s.port, s.pid)
                grown, took = big_heads(s.port, s.pid)
                memory[s.name] = (grown, took, held)
                print(f"{s.name}: 4 x 100 MB heads +{grown:.0f} MB in {took:.1f} s; "
                      f"512 x 60 KiB held heads +{held:.0f} MB", flush=True)

    names = ["before (uvicorn defaults)", "after (guarded)"]
    print(f"\n## HTTP guard: what the bounds on request heads cost\n\n"
          f"Produced by `.venv/bin/python -m bench.http_guard --seconds {args.seconds:g} "
          f"--rounds {args.rounds}{'' if args.memory else ' --no-memory'}` on {started}; "
          f"machine: {machine()}.\n\n"
          f"Requests per second over {CONNECTIONS} kept-alive connections (one Python "
          f"client process on the same machine), median of {args.rounds} interleaved rounds "
          f"of {args.seconds:g} s (min–max):\n")
    print_table(names, rates)
    print("\nServer CPU time per request (user + system, µs), median (min–max):\n")
    print_table(names, cpus)
    if not memory:
        return
    print("\nServer memory (RSS growth of the server process):\n")
    print("| attack | " + " | ".join(names) + " |")
    print("|---|---|---|")
    print("| 4 clients each sending a 100 MB unfinished head (peak growth; seconds until "
          "the clients are done, cut at 60 s) | "
          + " | ".join(f"+{memory[n][0]:,.0f} MB, {memory[n][1]:.1f} s" for n in names) + " |")
    print("| 512 connections each holding an unfinished 60 KiB head | "
          + " | ".join(f"+{memory[n][2]:,.0f} MB" for n in names) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
