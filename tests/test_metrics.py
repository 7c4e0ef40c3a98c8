"""GET /metrics (Prometheus) and OpenTelemetry traces, scraped from real servers while
downloads run and after: the counters move by exactly what was sent.

One server of the module's own does it all (a server start is the dear part): two
workers (prometheus-client's multiprocess mode, set up by `exporter serve`), the
separate bind, tracing to a file. The session server checks the one-process case.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Settings
from tests.support import ROOT, Server, fetch, free_port, wait_until

MiB = 1024 * 1024
LARGE = "/files/large.bin"  # 256 MiB (tests/conftest.py): more than the socket buffers
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def workers(make_module_server: type[Server], traces: Path) -> Iterator[Server]:
    """Two workers, the separate bind, traces to a file (flushed every 50 ms), no wait
    for a download slot (a request over the cap is refused at once), fast sampling."""
    bind = f"127.0.0.1:{free_port()}"
    s = make_module_server({
        "EXPORTER_METRICS_BIND": bind, "EXPORTER_METRICS_INTERVAL": "0.2",
        "EXPORTER_TRACING": "console", "EXPORTER_TRACING_FILE": str(traces),
        "OTEL_BSP_SCHEDULE_DELAY": "50", "EXPORTER_LIMIT_WAIT": "0"})

    def two_workers(port: int) -> list[str]:
        return [sys.executable, "-m", "exporter.cli", "serve", "--port", str(port),
                "--no-access-log", "--workers", "2"]

    s._default_command = two_workers
    s.command = two_workers(s.port)
    s.bind = bind  # type: ignore[attr-defined]
    s.start()
    yield s


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return parse(answer.text)


def test_metrics_are_for_admins_and_say_what_one_process_did(server: Server, admin: str
                                                              ) -> None:
    anonymous = httpx.get(server.url + "/metrics")
    assert anonymous.status_code == 401, anonymous.text
    before = scrape(server.url + "/metrics", admin)
    body = httpx.get(server.url + "/files/README.txt").content
    after = scrape(server.url + "/metrics", admin)
    route = {"route": "/files/{path:path}", "method": "GET", "status": "200"}
    assert (value(after, "exporter_http_requests_total", **route)
            - value(before, "exporter_http_requests_total", **route)) == 1
    assert (value(after, "exporter_sent_bytes_total", kind="file")
            - value(before, "exporter_sent_bytes_total", kind="file")) == len(body)
    # An OpenMetrics version that is no number: the text format (it was a 500).
    odd = httpx.get(server.url + "/metrics", headers={
        "Authorization": f"Bearer {admin}", "Accept": "application/openmetrics-text;version=abc"})
    assert odd.status_code == 200, odd.status_code
    assert odd.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    # One process: its own values, and the process collector's beside them.
    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "exporter_db_pool_connections_max", pool="primary") == 30


def test_counters_move_by_what_was_sent_across_two_workers(
        workers: Server, admin: str, database_url: str, traces: Path) -> None:
    app_metrics = workers.url + "/metrics"
    bind_metrics = f"http://{workers.bind}/metrics"  # type: ignore[attr-defined]
    s = Settings()
    # Both workers sample their pools: the sum is two pools' worth.
    assert wait_until(lambda: value(scrape(bind_metrics), "exporter_db_pool_connections_max",
                                    pool="primary") == 2 * (s.pool_size + s.pool_max_overflow),
                      30)
    before = scrape(app_metrics, admin)

    # Four downloads at once (the per-principal cap), each left unread after its first
    # bytes: in progress, each holding its slot; a fifth is refused.
    with ExitStack() as held:
        streams = []
        for _ in range(4):
            client = held.enter_context(httpx.Client(timeout=30))
            response = held.enter_context(client.stream("GET", workers.url + LARGE))
            assert response.status_code == 200
            # Kept: the iterator, dropped, would close the connection.
            chunks = response.iter_raw(65536)
            next(chunks)
            streams.append(chunks)
        during = scrape(app_metrics, admin)
        with httpx.stream("GET", workers.url + LARGE) as refused:
            assert refused.status_code == 429, refused.status_code
        assert value(during, "exporter_downloads_active", kind="file") == 4
        assert value(during, "exporter_slots_held", cap="principal") == 4
        sent = (value(during, "exporter_sent_bytes_total", kind="file")
                - value(before, "exporter_sent_bytes_total", kind="file"))
        assert 4 * 65536 <= sent < 4 * 256 * MiB
    # Left unread, then closed: aborted.

    # Ranges read whole, traced (a trace id of the test's own), three at a time on new
    # connections until both workers served some (the audit names the process).
    first_id = fetch(database_url, "SELECT coalesce(max(id), 0) AS id FROM"
                     " exporter.downloads")[0]["id"]
    size, done = 20_000_000, 0

    def ranged(_: int) -> int:
        with httpx.Client(timeout=30) as client:
            got = client.get(workers.url + LARGE, headers={
                "Range": f"bytes=0-{size - 1}",
                "traceparent": f"00-{TRACE_ID}-{os.urandom(8).hex()}-01"})
        assert got.status_code == 206, got.status_code
        return len(got.content)

    with ThreadPoolExecutor(3) as pool:
        for _ in range(5):
            assert list(pool.map(ranged, range(3))) == [size] * 3
            done += 3
            served = fetch(database_url, "SELECT count(DISTINCT instance) AS n FROM"
                           " exporter.downloads WHERE id > $1", first_id)[0]["n"]
            if served == 2:
                break
    assert served == 2, "every range was served by one worker"
    export = httpx.get(workers.url + "/datasets/orders.csv?limit=1234",
                       headers={"Accept-Encoding": "identity"})
    assert export.status_code == 200, export.status_code

    def settled() -> Samples | None:
        now = scrape(app_metrics, admin)
        ended = (value(now, "exporter_downloads_active", kind="file") == 0
                 and value(now, "exporter_downloads_active", kind="export") == 0
                 and value(now, "exporter_slots_held", cap="principal") == 0)
        return now if ended else None

    assert wait_until(settled, 30)
    after = settled()
    assert after is not None

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    aborted = moved("exporter_sent_bytes_total", kind="file") - done * size
    assert 4 * 65536 <= aborted < 4 * 256 * MiB  # the four cut downloads' part
    # The ranges went out with sendfile in both workers, but for each one's last 4 KiB
    # (read and checked); the cut downloads too, if the file's digest was known.
    zero_copy = moved("exporter_sendfile_bytes_total")
    assert done * (size - 4096) <= zero_copy <= done * (size - 4096) + aborted
    assert moved("exporter_downloads_total", kind="file", status="aborted") == 4
    assert moved("exporter_downloads_total", kind="file", status="complete") == done
    assert moved("exporter_refused_total", status="429", reason="principal_cap") == 1
    assert moved("exporter_export_rows_total") == 1234
    assert moved("exporter_export_copy_seconds_count") == 1
    assert moved("exporter_sent_bytes_total", kind="export") == len(export.content)
    assert moved("exporter_downloads_total", kind="export", status="complete") == 1
    route = {"route": LARGE.replace("large.bin", "{path:path}"), "method": "GET"}
    assert moved("exporter_http_requests_total", **route, status="206") == done
    assert moved("exporter_http_requests_total", **route, status="429") == 1
    assert moved("exporter_http_first_byte_seconds_count", route=route["route"]) == done + 5
    # The separate bind (the workers' parent, no credentials) adds up the same files.
    bound = scrape(bind_metrics)
    for name, labels in [("exporter_sent_bytes_total", {"kind": "file"}),
                         ("exporter_export_rows_total", {})]:
        assert value(bound, name, **labels) == value(after, name, **labels)
    # The stored copy of the export (for resuming), counted from the database.
    assert wait_until(lambda: value(scrape(bind_metrics), "exporter_stored_exports",
                                    kind="streamed", state="complete") >= 1, 10)

    # Traces: each traced range is one span (no span per chunk sent).
    def spans() -> list[dict[str, object]]:
        lines = traces.read_text().splitlines() if traces.exists() else []
        found = [json.loads(line) for line in lines]
        return [span for span in found
                if span["context"]["trace_id"] == f"0x{TRACE_ID}"]  # type: ignore[index]

    assert wait_until(lambda: len(spans()) >= done, 10)
    time.sleep(0.2)  # the test is that no more come: a flush interval and more
    assert len(spans()) == done, [span["name"] for span in spans()]

    # The workers' folder: a temporary one of `exporter serve`'s, gone once it stopped.
    folders = {child.environ().get("PROMETHEUS_MULTIPROC_DIR")
               for child in psutil.Process(workers.pid).children()}
    assert len(folders) == 1
    folder = Path(str(folders.pop()))
    assert folder.is_dir() and folder.is_relative_to(tempfile.gettempdir())
    assert not folder.is_relative_to(ROOT)
    workers.stop()
    assert not folder.exists()


def test_the_pool_sampled_counts_who_waits_for_a_connection(database_url: str) -> None:
    """SQLAlchemy counts no waiters: the sampler reads them under its queue. A pool of
    one, held, and a second check-out waiting for it."""
    from exporter import metrics
    from exporter.db import create_engine

    async def go() -> tuple[float, float, float]:
        engine = create_engine(Settings(pool_size=1, pool_max_overflow=0), database_url)
        try:
            async with engine.connect():
                waiter = asyncio.ensure_future(engine.connect().__aenter__())
                # No event says a check-out waits: looked for, for up to 5 s.
                for _ in range(500):
                    if _getters(engine):
                        break
                    await asyncio.sleep(0.01)
                metrics._pool("test", engine)
                found = (metrics.POOL_IN_USE.labels("test")._value.get(),
                         metrics.POOL_WAITING.labels("test")._value.get(),
                         metrics.POOL_MAX.labels("test")._value.get())
            conn = await waiter
            await conn.close()
            metrics._pool("test", engine)
            assert metrics.POOL_WAITING.labels("test")._value.get() == 0
            return found
        finally:
            await engine.dispose()

    assert asyncio.run(go()) == (1, 1, 1)


def _getters(engine: Any) -> Any:
    return engine.pool._pool.__dict__.get("_queue") and engine.pool._pool._queue._getters


def test_dataset_names_are_labels_only_when_the_setting_allows() -> None:
    from exporter import metrics

    def rows(dataset: str) -> float | None:
        return REGISTRY.get_sample_value("exporter_dataset_export_rows_total",
                                         {"dataset": dataset})

    try:
        metrics.download_started("export")
        metrics.download_ended("export", "complete", "secret_a", 5)
        assert rows("secret_a") is None
        metrics.configure(dataset_labels=True)
        metrics.download_started("export")
        metrics.download_ended("export", "complete", "named_b", 7)
        assert rows("named_b") == 7
    finally:
        metrics.configure(dataset_labels=False)
