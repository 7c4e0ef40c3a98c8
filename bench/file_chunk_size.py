"""Throughput and server memory of file downloads for several `file_chunk_size` values.

    .venv/bin/python -m bench.file_chunk_size DATABASE_URL FILES_ROOT LARGE SMALL

Starts `exporter serve` once per chunk size, downloads LARGE once with curl (one
stream), then SMALL with 50 curls at once, and prints MB/s and the server's peak RSS.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.support import Server, peak_rss_bytes

SIZES = [64 * 1024, 256 * 1024, 1024 * 1024]
CLIENTS = 50


def curl(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["curl", "-sS", "-o", "/dev/null", url])


def main(database_url: str, root: str, large: str, small: str) -> None:
    for chunk in SIZES:
        env = {"EXPORTER_FILES_ROOT": root, "EXPORTER_FILE_CHUNK_SIZE": str(chunk)}
        with Server(database_url, Path(f"/tmp/bench-{chunk}.log"), env) as s:
            size = (Path(root) / large).stat().st_size
            t = time.monotonic()
            curl(f"{s.url}/files/{large}").wait()
            single = size / (time.monotonic() - t) / 1e6
            size = (Path(root) / small).stat().st_size
            t = time.monotonic()
            for p in [curl(f"{s.url}/files/{small}") for _ in range(CLIENTS)]:
                p.wait()
            many = CLIENTS * size / (time.monotonic() - t) / 1e6
            print(f"{chunk // 1024:5d} KiB: 1 client {single:7.0f} MB/s, {CLIENTS} clients "
                  f"{many:7.0f} MB/s, peak RSS {peak_rss_bytes(s.pid) / 1e6:5.0f} MB", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
