"""The metrics around the server process: prometheus-client's multiprocess folder for
`--workers N`, and EXPORTER_METRICS_BIND, the separate address that serves /metrics
without authentication.

`exporter serve` calls `prepared` before it starts uvicorn: with more than one worker it
makes a temporary folder, names it in PROMETHEUS_MULTIPROC_DIR (which the workers, new
processes, inherit and read before their first metric exists) and removes it at exit. A
folder named by the operator is used as it is and left alone. The separate bind is
served by this process, the workers' parent, from a thread (prometheus-client's own
server): with one worker it reads this process's values, with several the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter.metrics import MULTIPROC_DIR as MULTIPROC_DIR
from exporter.metrics import registry

log = logging.getLogger(__name__)


@contextlib.contextmanager
def multiprocess_folder(workers: int) -> Iterator[str | None]:
    """The folder the workers' values go to (None with one worker: they stay in memory)."""
    given = os.environ.get(MULTIPROC_DIR)
    if given or workers <= 1:
        yield given or None
        return
    # Never in the checkout: the system's temporary folder, this run's own.
    path = tempfile.mkdtemp(prefix="exporter-metrics-")
    os.environ[MULTIPROC_DIR] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_DIR, None)
        shutil.rmtree(path, ignore_errors=True)


class _Scrape(Collector):
    """The registry of each scrape, chosen then: the folder may be set after the start."""

    def collect(self) -> Iterable[Metric]:
        return registry().collect()


def split_bind(bind: str) -> tuple[str, int]:
    """("127.0.0.1", 9100) of "127.0.0.1:9100"; ("::1", 9100) of "[::1]:9100"."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_bind(bind: str) -> Callable[[], None]:
    """Serve GET /metrics (any path, as prometheus-client does) on `bind`, from a thread;
    what stops it. OSError if the address cannot be listened on."""
    if not bind:
        return lambda: None
    from prometheus_client import start_http_server

    host, port = split_bind(bind)
    httpd, thread = start_http_server(port, host, registry=_Scrape())
    log.info("metrics on http://%s/metrics (EXPORTER_METRICS_BIND)", bind)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop
