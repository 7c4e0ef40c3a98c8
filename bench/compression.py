"""Compressed exports: identity, gzip and zstd on loopback and over a 100 Mbit/s link.

    .venv/bin/python -m bench.compression [--quick] [--rows N] [--rounds N]

The demo table (`exports.orders`, N rows; default 200,000, `--quick` 20,000) in the
benchmark's embedded PostgreSQL (var/bench-compression/, kept between runs), one
`exporter serve` with default settings, real `curl` processes, interleaved rounds.
Prints markdown: the loopback table (raw codings as the server sends them, and zstd as
`curl --compressed` decodes it), the rate-limited table (`curl --limit-rate 12.5M`,
about 100 Mbit/s, `--compressed`), ratios against the identity run of the same session,
server peak RSS, and the speed and ratio of each compression level on the same CSV (why
the defaults are gzip 1 and zstd 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import statistics
import sys
import time
from collections.abc import Callable

import zstandard

from bench.database import database
from bench.exports import exporter_service
from bench.harness import (
    MB,
    ROOT,
    Contender,
    Plan,
    Result,
    Run,
    Service,
    curl,
    fmt_bytes,
    fmt_seconds,
    interleaved,
    machine,
)

PATH = "/datasets/orders.csv"
# curl --limit-rate, bytes a second: 12.5 MB/s, about 100 Mbit/s (this curl refuses "12.5M").
RATE = "12500000"


def contender(name: str, server: Service, options: list[str], expect: int | None,
              shown: str) -> Contender:
    def run() -> Run:
        r = curl(server.url + PATH, *options)
        if r.status != 200:
            raise RuntimeError(f"{name}: HTTP {r.status}")
        # --compressed: curl counts what it received; the body it wrote is checked once
        # below (decoded_size), not on every timed run.
        if expect is not None and r.bytes != expect:
            raise RuntimeError(f"{name}: {r.bytes} bytes, expected {expect}")
        return Run(r.seconds, r.bytes, first_byte=r.first_byte)

    return Contender(name, shown, run, server_pid=lambda: server.pid)


def decoded_size(server: Service, coding: str) -> int:
    """What `curl --compressed` writes for this coding: checked to be the identity length."""
    import subprocess

    done = subprocess.run(["curl", "-sS", "--compressed", "-H", f"Accept-Encoding: {coding}",
                           server.url + PATH], capture_output=True, check=True)
    return len(done.stdout)


def table(results: list[Result], identity: Result, identity_bytes: int) -> list[str]:
    rows = ["| contender | command | median time | spread (min–max) | bytes on the wire | "
            "CSV throughput | server peak RSS | vs identity |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        times = [x.seconds for x in r.runs]
        rows.append(
            f"| {r.contender.name} | `{r.contender.command}` | {fmt_seconds(r.median_seconds)} "
            f"| {fmt_seconds(min(times))} – {fmt_seconds(max(times))} | "
            f"{r.bytes / MB:,.1f} MB ({identity_bytes / r.bytes:.1f}×) | "
            f"{identity_bytes / r.median_seconds / MB:,.0f} MB/s | {fmt_bytes(r.peak_rss)} | "
            f"**{identity.median_seconds / r.median_seconds:.2f}×** |")
    return rows


def levels(sample: bytes) -> list[str]:
    """Single-thread speed and ratio of each level on the export's own bytes."""
    rows = ["| coding, level | compress speed (one core) | ratio |", "|---|---|---|"]
    cases: list[tuple[str, Callable[[bytes], bytes]]] = [
        (f"gzip {n}", lambda b, n=n: gzip.compress(b, n, mtime=0)) for n in (1, 6, 9)
    ] + [
        (f"zstd {n}", lambda b, n=n: zstandard.ZstdCompressor(level=n).compress(b))
        for n in (1, 3, 6, 9)
    ]
    for name, compress in cases:
        t = time.perf_counter()
        out = compress(sample)
        seconds = time.perf_counter() - t
        rows.append(f"| {name} | {len(sample) / seconds / MB:,.0f} MB/s | "
                    f"{len(sample) / len(out):.1f}× |")
    return rows


def threads(sample: bytes, counts: tuple[int, ...] = (1, 2, 4), rounds: int = 3
            ) -> list[str]:
    """zstd at the server's level in 1, 2, 4 threads (compression.py's `threads`), fed the
    sample in an export's 64 KiB chunks: wall and CPU time, median of interleaved rounds."""
    import resource

    from exporter.compression import ZSTD

    def once(n: int) -> tuple[float, float, int]:
        compressor = ZSTD.compressor(threads=n)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        started = time.perf_counter()
        size = sum(len(compressor.compress(sample[at:at + 65536], False))
                   for at in range(0, len(sample), 65536)) + len(compressor.finish())
        seconds = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return seconds, usage.ru_utime + usage.ru_stime - cpu, size

    runs: dict[int, list[tuple[float, float, int]]] = {n: [] for n in counts}
    for turn in range(rounds):
        for n in counts[turn % len(counts):] + counts[:turn % len(counts)]:
            runs[n].append(once(n))
    rows = ["| threads | compress speed (wall) | CPU seconds | ratio |", "|---|---|---|---|"]
    for n, found in runs.items():
        seconds = statistics.median(r[0] for r in found)
        rows.append(f"| {n} | {len(sample) / seconds / MB:,.0f} MB/s | "
                    f"{statistics.median(r[1] for r in found):.2f} s | "
                    f"{len(sample) / found[0][2]:.2f}× |")
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.compression", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    work = ROOT / "var" / ("bench-compression-quick" if args.quick else "bench-compression")
    plan = dataclasses.replace(
        Plan.make(args.quick, out=work, work=work),
        demo_rows=args.rows or (20_000 if args.quick else 200_000),
        generated_rows=1000, repetitions=args.rounds or (2 if args.quick else 3))
    started = time.monotonic()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    with database(plan, log) as url, exporter_service(plan, url, "compression") as server:
        server.start("/healthz")
        identity_bytes = curl(server.url + PATH).bytes
        for coding in ("gzip", "zstd"):
            if decoded_size(server, coding) != identity_bytes:
                raise RuntimeError(f"curl --compressed ({coding}) wrote another length")
        loopback = [
            contender("identity", server, [], identity_bytes, f"curl -o /dev/null {PATH}"),
            # Compressed sizes vary by a few bytes from run to run (a body that waited a
            # second for rows is flushed, exporter/compression.py): not checked exactly;
            # what curl decodes was checked above.
            contender("gzip", server, ["-H", "Accept-Encoding: gzip"], None,
                      "curl -H 'Accept-Encoding: gzip'"),
            contender("zstd", server, ["-H", "Accept-Encoding: zstd"], None,
                      "curl -H 'Accept-Encoding: zstd'"),
            contender("zstd, decoded by curl", server,
                      ["--compressed", "-H", "Accept-Encoding: zstd"], None,
                      "curl --compressed -H 'Accept-Encoding: zstd'"),
        ]
        log(f"loopback: {plan.repetitions} interleaved rounds")
        fast = interleaved(loopback, plan.repetitions, log)
        limited = [
            contender("identity", server, ["--limit-rate", RATE], identity_bytes,
                      f"curl --limit-rate {RATE} {PATH}"),
            contender("gzip", server, ["--limit-rate", RATE, "--compressed", "-H",
                                       "Accept-Encoding: gzip"], None,
                      f"curl --limit-rate {RATE} --compressed -H 'Accept-Encoding: gzip'"),
            contender("zstd", server, ["--limit-rate", RATE, "--compressed", "-H",
                                       "Accept-Encoding: zstd"], None,
                      f"curl --limit-rate {RATE} --compressed -H 'Accept-Encoding: zstd'"),
        ]
        log(f"rate-limited: {plan.repetitions} interleaved rounds")
        slow = interleaved(limited, plan.repetitions, log, warmup=False)
        import subprocess

        sample = subprocess.run(["curl", "-sS", server.url + PATH], capture_output=True,
                                check=True).stdout[:64 * 2**20]
    fast_id = fast[0]
    slow_id = slow[0]
    zstd_ratio = fast_id.median_seconds / fast[2].median_seconds
    limited_ratio = slow_id.median_seconds / statistics.median(
        [r.median_seconds for r in slow[1:]])
    print("\n".join([
        f"Measured by `.venv/bin/python -m bench.compression"
        f"{' --quick' if args.quick else ''}{f' --rows {args.rows}' if args.rows else ''}` "
        f"on {time.strftime('%Y-%m-%d')}, {machine()}, in "
        f"{(time.monotonic() - started) / 60:.1f} minutes: `{PATH}` of "
        f"{plan.demo_rows:,} demo rows ({identity_bytes / MB:,.1f} MB of CSV), "
        f"{plan.repetitions} interleaved rounds, median.",
        "",
        "Loopback (CSV throughput: the identity bytes delivered per second; bytes on the "
        "wire with the ratio to identity):",
        "",
        *table(fast, fast_id, identity_bytes),
        "",
        f"Over about 100 Mbit/s (`--limit-rate {RATE}`, curl decoding):",
        "",
        *table(slow, slow_id, identity_bytes),
        "",
        f"zstd on loopback at **{zstd_ratio:.2f}×** identity (target 0.8× or better: "
        f"{'met' if zstd_ratio >= 0.8 else 'NOT met'}); compressed over 100 Mbit/s "
        f"**{limited_ratio:.1f}×** faster than identity (target 3×: "
        f"{'met' if limited_ratio >= 3 else 'NOT met'}).",
        "",
        f"Compression levels on the first {len(sample) / MB:,.0f} MB of the same CSV, in "
        "one Python thread (the server compresses one chunk in flight per download, in a "
        "worker thread):",
        "",
        *levels(sample),
        "",
        "zstd in several threads (a parallel export's), on the same CSV:",
        "",
        *threads(sample),
    ]))


if __name__ == "__main__":
    main(sys.argv[1:])
