"""What the stored copy of a streamed export costs, and what resuming saves.

    .venv/bin/python -m bench.resume [--quick] [--rows N] [--rounds N]

The demo table (`exports.orders`, N rows; default 1,000,000, `--quick` 100,000) in the
benchmark's embedded PostgreSQL (var/bench-resume/, kept between runs). Two `exporter
serve` processes on it, one with the default settings (every identity export keeps a
copy, EXPORTER_EXPORTS_RESUME=true) and one without copies, and psql `\\copy` of the same
query as the reference, in interleaved rounds of real `curl` runs. Then a download cut
at half (curl killed) and resumed with `curl -C -`: how long the copy took to complete
after the client left, how long the resume took, against a whole download. Prints
markdown with server peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.database import database
from bench.exports import Query, exporter_service, psql_bytes, psql_contender
from bench.harness import (
    MB,
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

PATH = "/datasets/orders.csv?order=id"
IDENTITY = {"Accept-Encoding": "identity"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exporter_contender(name: str, server: Service, expect: int) -> Contender:
    def run() -> Run:
        r = curl(server.url + PATH)
        if r.status != 200 or r.bytes != expect:
            raise RuntimeError(f"{name}: HTTP {r.status}, {r.bytes} bytes, expected {expect}")
        return Run(r.seconds, r.bytes, first_byte=r.first_byte)

    return Contender(name, f"curl -o /dev/null '{PATH}'", run, server_pid=lambda: server.pid)


def cut_and_resume(server: Service, size: int, folder: Path) -> dict[str, float]:
    """A download killed at half, its copy's completion, and `curl -C -`."""
    out = folder / "out.csv"
    url = server.url + PATH
    started = time.perf_counter()
    whole = subprocess.run(["curl", "-sS", "-o", str(out), url], check=True)
    whole_seconds = time.perf_counter() - started
    assert whole.returncode == 0 and out.stat().st_size == size
    out.unlink()
    # Slowed so that half of it is reached while the server still sends.
    p = subprocess.Popen(["curl", "-sS", "-D", str(folder / "headers"), "--limit-rate",
                          str(max(size // 4, 1_000_000)), "-o", str(out), url])
    while not out.exists() or out.stat().st_size < size // 2:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = time.perf_counter()
    location = next(line.split(":", 1)[1].strip() for line in
                    (folder / "headers").read_text().splitlines()
                    if line.lower().startswith("content-location:"))
    status_url = server.url + location.rsplit("/", 1)[0]
    while httpx.get(status_url, headers=IDENTITY).json()["status"] == "running":
        time.sleep(0.01)
    completed = time.perf_counter() - left
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-C", "-", "-o", str(out), url], check=True)
    resumed = time.perf_counter() - started
    if out.stat().st_size != size:
        raise RuntimeError("the resumed file has another length")
    return {"whole": whole_seconds, "completed": completed, "resumed": resumed}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.resume", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    work = ROOT / "var" / ("bench-resume-quick" if args.quick else "bench-resume")
    plan = dataclasses.replace(
        Plan.make(args.quick, out=work, work=work),
        demo_rows=args.rows or (100_000 if args.quick else 1_000_000),
        generated_rows=1000, repetitions=args.rounds or (2 if args.quick else 5))
    exports_dir = work / "exports"
    with (database(plan, log) as url,
          exporter_service(plan, url, "copies", {"EXPORTER_EXPORTS_DIR": str(exports_dir)})
          as copies,
          exporter_service(plan, url, "no-copies", {"EXPORTER_EXPORTS_DIR": str(exports_dir),
                                                    "EXPORTER_EXPORTS_RESUME": "false"})
          as plain):
        copies.start("/healthz")
        plain.start("/healthz")
        query = Query("csv", "\\copy (SELECT * FROM exports.orders ORDER BY id) TO STDOUT"
                      " WITH (FORMAT csv, HEADER)", PATH)
        size = psql_bytes(url, query.copy)
        contenders = [
            psql_contender("psql CSV (ORDER BY id)", url, query, size),
            exporter_contender("exporter, with its copy (default)", copies, size),
            exporter_contender("exporter, EXPORTER_EXPORTS_RESUME=false", plain, size),
        ]
        log(f"{plan.repetitions} interleaved rounds")
        results = interleaved(contenders, plan.repetitions, log)
        with tempfile.TemporaryDirectory() as folder:
            resume = [cut_and_resume(copies, size, Path(folder)) for _ in range(3)]
    psql, with_copy, without = results
    lines = [
        f"### Resume: the cost of the stored copy ({plan.demo_rows:,} rows, "
        f"{size / MB:,.0f} MB of CSV)", "",
        f"`.venv/bin/python -m bench.resume{' --quick' if args.quick else ''}` "
        f"({machine()}), {plan.repetitions} interleaved rounds.", "",
        "| contender | median time | throughput | vs psql | server peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.contender.name} | {fmt_seconds(r.median_seconds)} | "
                     f"{r.throughput():,.0f} MB/s | "
                     f"**{psql.median_seconds / r.median_seconds:.2f}×** | "
                     f"{fmt_bytes(r.peak_rss) if r.peak_rss else '—'} |")
    overhead = with_copy.median_seconds / without.median_seconds
    lines += [
        "",
        f"Keeping the copy makes a streamed export take {overhead:.2f}× as long as without "
        "one (its bytes are written to the exports folder, and hashed, as they are sent).",
        "",
        "| cut at half, then | median of 3 |", "|---|---|",
        f"| a whole download | {fmt_seconds(statistics.median(r['whole'] for r in resume))} |",
        "| the copy completed, after the client left | "
        f"{fmt_seconds(statistics.median(r['completed'] for r in resume))} |",
        f"| `curl -C -` of the second half | "
        f"{fmt_seconds(statistics.median(r['resumed'] for r in resume))} |",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
