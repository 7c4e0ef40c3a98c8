"""What watching exports for stalled clients costs: whole-export throughput with the
idle timeout on (its default, a timer around each body `send`) and off.

    .venv/bin/python -m bench.export_watch [DATABASE_URL] [REPETITIONS]

Without a URL an embedded PostgreSQL is started in a temporary folder. Creates the
view `exports.watch_bench` (2,000,000 generated rows, about 200 MB of CSV), starts
`exporter serve` twice (EXPORTER_EXPORT_IDLE_TIMEOUT=0 and the default) and downloads
the whole view with curl, alternating between the two, and prints the median time.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support import Server, run_sql

VIEW = ("CREATE OR REPLACE VIEW exports.watch_bench AS"
        " SELECT g AS id, md5(g::text) AS hash, g * 1.25 AS amount,"
        " timestamptz '2026-01-01' + g * interval '1 second' AS at, repeat('y', 60) AS pad"
        " FROM (SELECT generate_series(1, 2000000) AS g) AS s")
SETTINGS = {"idle timeout off": {"EXPORTER_EXPORT_IDLE_TIMEOUT": "0"},
            "idle timeout 60 s (default)": {}}


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from exporter.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="watch-bench-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        try:
            yield pg.start()
        finally:
            pg.stop()


def download(url: str) -> tuple[float, int]:
    started = time.monotonic()
    out = subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}",
                          url], capture_output=True, text=True, check=True).stdout
    return time.monotonic() - started, int(out)


def main(url: str | None, repetitions: int) -> None:
    with database(url) as db, tempfile.TemporaryDirectory(prefix="watch-logs-") as logs:
        run_sql(db, "CREATE SCHEMA IF NOT EXISTS exports", VIEW)
        servers = {name: Server(db, Path(logs) / f"{i}.log",
                                {"EXPORTER_PUBLIC_DATASETS": '["*"]', **env})
                   for i, (name, env) in enumerate(SETTINGS.items())}
        times: dict[str, list[float]] = {name: [] for name in servers}
        size = 0
        try:
            for s in servers.values():
                s.start(timeout=120)
                download(s.url + "/datasets/watch_bench.csv?limit=10")  # warm up
            for _ in range(repetitions):
                for name, s in servers.items():
                    seconds, size = download(s.url + "/datasets/watch_bench.csv")
                    times[name].append(seconds)
        finally:
            for s in servers.values():
                s.stop()
        print(f"{size / 1e6:.0f} MB of CSV, {repetitions} runs each, interleaved")
        for name, runs in times.items():
            median = statistics.median(runs)
            print(f"{name:28s} median {median:.2f} s  {size / median / 1e6:6.0f} MB/s  "
                  f"(min {min(runs):.2f}, max {max(runs):.2f})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 and "://" in sys.argv[1] else None,
         int(sys.argv[-1]) if len(sys.argv) > 1 and sys.argv[-1].isdigit() else 5)
