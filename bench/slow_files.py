"""Server memory against the number of slow file clients (10, 100, 1,000).

Each client is a raw socket that sends one Range GET and then reads a few bytes per
second (half of them) or nothing at all (the other half): the server can hand each
one no more than its socket buffers take, so what it holds beyond that is its own.
A fresh server per count; its RSS is sampled while the clients hang on, its peak is
the kernel's high-water mark (VmHWM), and the RSS a few seconds after they all left
shows whether the memory goes back. Every byte a client did get is compared with the
file.

    .venv/bin/python -m bench.slow_files [--clients 10,100,1000] [--seconds 10]

prints a markdown table (the one in docs/benchmarks.md); `section()` is the same
measurement as a part of `./scripts/bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import MiB, Plan, RssSampler, Section, Service, fmt_bytes, tree_rss

Log = Callable[[str], None]
FILE_NAME = "slow.bin"
FILE_SIZE = 256 * MiB
RANGE_SIZE = 10 * MiB
# Seconds after the clients left when the server's RSS is taken again: it has ended the
# downloads and written their audit rows (1,000 of them take a while) by then.
AFTER = 20
HEAD_END = b"\r\n\r\n"


@dataclass
class SlowClient:
    sock: socket.socket
    start: int
    end: int  # inclusive, as in the Range header
    reads: bool  # a few bytes per second, or nothing at all after the head
    received: bytearray = field(default_factory=bytearray)
    head: bytes | None = None

    @property
    def body(self) -> bytes:
        return bytes(self.received)


@dataclass
class SlowRun:
    clients: int
    peak_rss: int  # VmHWM of the server over its whole life
    held_rss: int  # the highest sample while the clients hung on
    idle_rss: int  # before the clients came
    after_rss: int  # AFTER seconds after they left
    body_bytes: int  # what the clients got, all together
    heads_seconds: float  # from the first connect to the last client's answer head


def raise_open_files(needed: int) -> None:
    """A socket per client here and one in the server (which inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"{needed} open files needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def client_ranges(count: int, file_size: int, range_size: int) -> list[tuple[int, int]]:
    span = file_size - range_size
    step = max(span // max(count - 1, 1), 1)
    return [((i * step) % (span + 1), (i * step) % (span + 1) + range_size - 1)
            for i in range(count)]


@contextlib.contextmanager
def slow_clients(port: int, path: str, ranges: Sequence[tuple[int, int]],
                 head_timeout: float = 120) -> Iterator[list[SlowClient]]:
    """Connected clients that have each sent their request and read their answer's head;
    every socket is closed on the way out."""
    clients: list[SlowClient] = []
    sel = selectors.DefaultSelector()
    try:
        for i, (a, b) in enumerate(ranges):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(SlowClient(s, a, b, reads=i % 2 == 0))
            # Small before connecting, so the window stays small: the server's socket
            # then takes little, and the rest waits in the server.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Range: bytes={a}-{b}\r\n\r\n".encode())
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, clients[-1])
        waiting = len(clients)
        deadline = time.monotonic() + head_timeout
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{waiting} of {len(clients)} clients got no answer head "
                                   f"within {head_timeout} s")
            for key, _ in sel.select(timeout=1):
                c: SlowClient = key.data
                c.received += c.sock.recv(1024 - len(c.received) % 1024 or 1024)
                if HEAD_END in c.received:
                    head, _, rest = bytes(c.received).partition(HEAD_END)
                    c.head, c.received = head, bytearray(rest)
                    sel.unregister(c.sock)
                    waiting -= 1
        yield clients
    finally:
        sel.close()
        for c in clients:
            c.sock.close()


def trickle(clients: Sequence[SlowClient], seconds: float, per_second: int,
            tick: Callable[[], None] = lambda: None) -> None:
    """The reading half takes `per_second` bytes a second from its socket, for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for c in clients:
            if c.reads:
                with contextlib.suppress(BlockingIOError):
                    c.received += c.sock.recv(per_second)
        tick()
        time.sleep(max(0.0, min(1.0, end - time.monotonic())))


def check(clients: Sequence[SlowClient], file_path: Path, file_size: int) -> int:
    """Each answer is a 206 for its range, and each body byte is the file's; the total."""
    total = 0
    with file_path.open("rb") as f:
        for c in clients:
            assert c.head is not None
            head = c.head.decode("latin-1").lower()
            if not head.startswith("http/1.1 206"):
                raise RuntimeError(f"answer to bytes={c.start}-{c.end}: {head[:200]!r}")
            if f"content-range: bytes {c.start}-{c.end}/{file_size}" not in head:
                raise RuntimeError(f"wrong Content-Range for bytes={c.start}-{c.end}: {head!r}")
            f.seek(c.start)
            if f.read(len(c.received)) != c.body:
                raise RuntimeError(f"wrong bytes for bytes={c.start}-{c.end}")
            total += len(c.received)
    return total


def measure(server: Service, file_path: Path, count: int, seconds: float,
            per_second: int = 64) -> SlowRun:
    size = file_path.stat().st_size
    raise_open_files(2 * count + 256)
    idle = tree_rss(server.pid)
    started = time.monotonic()
    with RssSampler(server.pid, interval=0.1) as sampler:
        with slow_clients(server.port, f"/files/{file_path.name}",
                          client_ranges(count, size, min(RANGE_SIZE, size))) as clients:
            heads = time.monotonic() - started
            trickle(clients, seconds, per_second)
            got = check(clients, file_path, size)
        held = sampler.peak
        # The server notices the closed sockets, ends the downloads, writes their audit
        # rows; then what it holds should go back.
        time.sleep(AFTER)
    with open(f"/proc/{server.pid}/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return SlowRun(count, hwm, held, idle, tree_rss(server.pid), got, heads)


def table(runs: Sequence[SlowRun]) -> list[str]:
    lines = ["| slow clients | server RSS idle | while they hang on (max) | peak (VmHWM) | "
             f"peak minus idle, per client | {AFTER} s after they left | "
             "bytes they got (checked) | all answer heads in |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        per = (r.peak_rss - r.idle_rss) / r.clients
        lines.append(
            f"| {r.clients:,} | {fmt_bytes(r.idle_rss)} | {fmt_bytes(r.held_rss)} | "
            f"{fmt_bytes(r.peak_rss)} | {per / 1024:,.0f} KiB | {fmt_bytes(r.after_rss)} | "
            f"{r.body_bytes:,} | {r.heads_seconds:.1f} s |")
    return lines


def run_counts(plan: Plan, url: str, root: Path, counts: Sequence[int], seconds: float,
               log: Log, env: dict[str, str] | None = None) -> list[SlowRun]:
    from bench.exports import exporter_service
    from bench.files import make_file

    path = root / FILE_NAME
    make_file(path, FILE_SIZE)
    runs = []
    for count in counts:
        log(f"files: {count} slow clients")
        with exporter_service(plan, url, f"exporter-slow-{count}", {
            "EXPORTER_FILES_ROOT": str(root),
            # All of them come from one address, the anonymous loopback principal.
            "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": str(count + 10),
            "EXPORTER_MAX_CONNECTIONS": str(count + 100),
            "EXPORTER_POOL_TIMEOUT": "60",
            **(env or {}),
        }) as server:
            server.start("/healthz")
            runs.append(measure(server, path, count, seconds))
            log("  " + table(runs[-1:])[-1])
    return runs


def section(plan: Plan, url: str, root: Path, log: Log) -> Section:
    counts = [10, 100] if plan.quick else [10, 100, 1000]
    seconds = 3 if plan.quick else 10
    runs = run_counts(plan, url, root, counts, seconds, log)
    s = Section("Files: server memory against slow clients")
    s.add(f"Each client sends `Range: bytes=a-b` ({fmt_bytes(RANGE_SIZE)}) for a "
          f"{fmt_bytes(FILE_SIZE)} file from one raw socket (16 KiB receive buffer), then half "
          f"of them read 64 bytes a second for {seconds:g} s and the other half nothing; "
          "a fresh server per count. Every body byte received was checked against the "
          "file. Target: 1,000 slow clients under 300 MB of server RSS.", "", *table(runs))
    big = runs[-1]
    s.headline.append(
        f"Files: {big.clients:,} slow clients: server peak RSS {fmt_bytes(big.peak_rss)} "
        f"(idle {fmt_bytes(big.idle_rss)}), {fmt_bytes(big.after_rss)} after they left.")
    return s


def main(argv: list[str] | None = None) -> None:
    from bench.database import database

    parser = argparse.ArgumentParser(prog="bench.slow_files", description=__doc__)
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--quick", action="store_true", help="the quick run's database")
    parser.add_argument("--env", action="append", default=[],
                        help="NAME=VALUE for the server (repeatable), to compare settings")
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick)
    env = dict(e.split("=", 1) for e in args.env)
    with database(plan, print) as url:
        runs = run_counts(plan, url, plan.work / "slow-files",
                          [int(c) for c in args.clients.split(",")], args.seconds, print, env)
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
