"""Listing a folder of 100,000 files, and /healthz while four such listings run.

    .venv/bin/python -m bench.listing [DATABASE_URL]

With no URL, an embedded PostgreSQL is started in a temporary folder. Prints the time
of `GET /files/big/?limit=1` on a folder never read (cold) and read before (warm), of
`limit=1000` and of the page `/?path=big/`, then the slowest `/healthz` answer while four
listings of another, cold 100,000-file folder run at once.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from exporter.cli import migrate
from tests.support import Server

ENTRIES = 100_000


def make_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(ENTRIES):
        os.close(os.open(folder / f"f{i:06d}.bin", os.O_CREAT | os.O_WRONLY, 0o644))


def timed(client: httpx.Client, url: str, **params: object) -> float:
    t = time.monotonic()
    r = client.get(url, params=params)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text[:200]
    return time.monotonic() - t


def run(database_url: str, tmp: Path) -> None:
    root = tmp / "root"
    make_folder(root / "big")
    make_folder(root / "big2")
    time.sleep(1.5)  # settled: an index read now may be kept
    env = {"EXPORTER_FILES_ROOT": str(root), "EXPORTER_PUBLIC_FILES": '["*"]'}
    with Server(database_url, tmp / "server.log", env) as s, \
            httpx.Client(base_url=s.url, timeout=300) as c:
        print(f"limit=1 cold     {timed(c, '/files/big/', limit=1) * 1000:8.1f} ms")
        print(f"limit=1 warm     {timed(c, '/files/big/', limit=1) * 1000:8.1f} ms")
        print(f"limit=1000 warm  {timed(c, '/files/big/', limit=1000) * 1000:8.1f} ms")
        print(f"offset=99999     {timed(c, '/files/big/', limit=1, offset=99_999) * 1000:8.1f} ms")
        print(f"page ?path=big/  {timed(c, '/', path='big/') * 1000:8.1f} ms")

        slowest, polls, done = 0.0, 0, threading.Event()

        def poll() -> None:
            nonlocal slowest, polls
            with httpx.Client(base_url=s.url, timeout=60) as h:
                while not done.is_set():
                    slowest = max(slowest, timed(h, "/healthz"))
                    polls += 1
                    time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        t = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: timed(httpx.Client(base_url=s.url, timeout=300),
                                          "/files/big2/", limit=1, offset=i), range(4)))
        wall = time.monotonic() - t
        done.set()
        poller.join()
        print(f"4 concurrent cold listings: {wall * 1000:.0f} ms; /healthz slowest "
              f"{slowest * 1000:.1f} ms over {polls} polls")


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        if argv:
            run(argv[0], Path(tmp))
            return
        from exporter.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(Path(tmp) / "pg")
        url = pg.start()
        try:
            migrate(url)
            run(url, Path(tmp))
        finally:
            pg.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
