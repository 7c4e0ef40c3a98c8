"""CPU the metrics add per request, and per body chunk, measured in this process.

    .venv/bin/python -m bench.metrics_cost [--requests N]

Drives a trivial ASGI app (an answer's start and one body message) N times with and
without exporter.metrics.RequestMetrics around it, plus the calls a download makes
(audit start and end, a slot taken and given back, a chunk counted), and prints the
CPU time (`time.process_time`) each adds, in microseconds: once with the values in
memory (one worker) and once in prometheus-client's multiprocess mode (--workers N,
values in memory-mapped files), each in a process of its own, since the mode is chosen
when prometheus-client is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from typing import Any


def _measure(requests: int) -> dict[str, float]:
    from exporter import metrics

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 100})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        return None

    class Route:
        path = "/files/{path:path}"

    scope = {"type": "http", "method": "GET", "path": "/files/a", "route": Route()}
    wrapped = metrics.RequestMetrics(app)

    async def loop(target: Any) -> float:
        start = time.process_time()
        for _ in range(requests):
            await target(dict(scope), receive, send)
        return time.process_time() - start

    async def both() -> dict[str, float]:
        plain = min([await loop(app) for _ in range(3)])
        counted = min([await loop(wrapped) for _ in range(3)])
        start = time.process_time()
        for _ in range(requests):
            metrics.download_started("file")
            metrics.slot_taken("principal")
            metrics.slot_given_back("principal")
            metrics.download_ended("file", "complete", "a", None)
        download = time.process_time() - start
        chunk = metrics.SENT.labels("file")
        start = time.process_time()
        for _ in range(requests):
            chunk.inc(65536)
        per_chunk = time.process_time() - start
        return {"request (middleware)": (counted - plain) / requests * 1e6,
                "download (audit start/end, a slot)": download / requests * 1e6,
                "body chunk": per_chunk / requests * 1e6}

    return asyncio.run(both())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for name, micros in _measure(args.requests).items():
            print(f"{name}\t{micros:.2f}")
        return
    print("| added CPU per | one worker (memory) | --workers N (multiprocess files) |")
    print("|---|---|---|")
    results: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as folder:
        for multiprocess in (False, True):
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            if multiprocess:
                env["PROMETHEUS_MULTIPROC_DIR"] = folder
            out = subprocess.run(
                [sys.executable, "-m", "bench.metrics_cost", "--child",
                 "--requests", str(args.requests)],
                env=env, check=True, capture_output=True, text=True).stdout
            results.append(dict(line.split("\t") for line in out.splitlines()))
    for name in results[0]:
        print(f"| {name} | {results[0][name]} µs | {results[1][name]} µs |")


if __name__ == "__main__":
    main()
