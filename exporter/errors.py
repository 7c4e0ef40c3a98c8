"""Errors that become a clear HTTP answer with a JSON body.

The body carries PostgREST's fields (`code`, `message`, `details`, `hint`) at the top
level, which PostgREST's clients read, beside the `error` object this API always had.
The codes are PostgREST's where one means the same, else PostgreSQL's SQLSTATE, else our
own `EXP` + the status (docs/api.md, "Errors").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy import exc as sa_exc

# Starlette's class, which FastAPI re-exports: the commands import this module too, and
# only `serve` needs FastAPI (0.2 s of a core to import).
from starlette.responses import JSONResponse

from exporter.audit import AuditUnavailable

log = logging.getLogger(__name__)


# PostgREST's code for what a status means in this API, where one matches
# (docs.postgrest.org, references/errors): a query string it cannot parse, a bad token,
# insufficient privilege (PostgreSQL's own 42501), an unsupported verb, a media type it
# cannot produce, a range past the end, the database unreachable, a statement cancelled.
POSTGREST_CODES = {400: "PGRST100", 401: "PGRST301", 403: "42501", 405: "PGRST117",
                   406: "PGRST107", 416: "PGRST103", 500: "PGRSTX00", 503: "PGRST000",
                   504: "57014"}
NO_TOKEN = "PGRST302"  # PostgREST's "anonymous access is disabled"
NO_TABLE = "PGRST205"  # PostgREST's "could not find the table in the schema cache"
POOL_TIMEOUT = "PGRST003"


def default_code(status: int) -> str:
    return POSTGREST_CODES.get(status, f"EXP{status}")


def error_body(status: int, message: str, *, code: str | None = None,
               parameter: str | None = None, details: str | None = None,
               hint: str | None = None) -> dict[str, Any]:
    """PostgREST's four fields, and our `error` object beside them."""
    error: dict[str, Any] = {"status": status, "message": message}
    if parameter is not None:
        error["parameter"] = parameter
    return {"code": code or default_code(status), "message": message, "details": details,
            "hint": hint, "error": error}


class ApiError(Exception):
    """A failure the client should hear about, with the status that describes it."""

    def __init__(
        self, status: int, message: str, *, parameter: str | None = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        code: str | None = None, hint: str | None = None, reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        # Why a 429 or 503 refused the request, in one word (exporter_refused_total).
        self.reason = reason
        self.parameter = parameter
        self.code = code or default_code(status)
        self.hint = hint
        # A list of pairs may repeat a name (two WWW-Authenticate challenges, say).
        items = headers.items() if isinstance(headers, Mapping) else headers or []
        self.headers: list[tuple[str, str]] = list(items)

    def response(self) -> JSONResponse:
        response = JSONResponse(self.body(), status_code=self.status)
        for name, value in self.headers:
            response.headers.append(name, value)
        return response

    def body(self) -> dict[str, Any]:
        # PostgREST's `details` say where the problem is: here, the parameter.
        details = f"parameter: {self.parameter}" if self.parameter is not None else None
        return error_body(self.status, self.message, code=self.code,
                          parameter=self.parameter, details=details, hint=self.hint)


def bad_parameter(parameter: str, message: str) -> ApiError:
    return ApiError(400, message, parameter=parameter)


def unavailable(error: BaseException, what: str = "the database") -> ApiError:
    """503; `what` names the server that failed ("the read replica")."""
    # The driver's own text may name the database user, host or query: it goes to the log.
    log.warning("%s unavailable: %s: %s", what, type(error).__name__, error)
    waited = isinstance(_driver_error(error), sa_exc.TimeoutError)
    reason = ("pool" if waited else "audit" if isinstance(error, AuditUnavailable)
              else "replica" if "replica" in what else "database")
    return ApiError(503, f"{what} is unavailable: {describe(error)}",
                    headers={"Retry-After": "5"}, code=POOL_TIMEOUT if waited else None,
                    reason=reason)


# What SQLAlchemy and asyncpg raise when the database is down, slow or refuses a query;
# with OSError and timeouts, what reaching it can raise.
DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, sa_exc.DBAPIError,
                 sa_exc.TimeoutError)
DATABASE_ERRORS = (*DRIVER_ERRORS, OSError, asyncio.TimeoutError)


def _driver_error(error: BaseException) -> BaseException:
    """The asyncpg error under SQLAlchemy's wrappers, if there is one."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, asyncpg.PostgresError | asyncpg.InterfaceError):
            break
        orig: BaseException | None = getattr(seen, "orig", None)
        seen = seen.__cause__ or orig
    return error if seen is None else seen


def sqlstate(error: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of a failed statement (e.g. 22P02), if the server sent one."""
    code = getattr(_driver_error(error), "sqlstate", None)
    return code if isinstance(code, str) else None


def postgres_message(error: BaseException) -> str:
    """The server's own message, one line, without the wrappers' prefixes: its DETAIL and
    HINT lines stay in the log (one said how the server was built: `xml` without libxml)."""
    text = str(_driver_error(error))
    return text.splitlines()[0] if text else text


# Errors of reaching the database rather than of running a query: the server's
# credentials refused, no such database, no connection slot left, shutting down.
_NOT_CONNECTED = (asyncpg.PostgresConnectionError, asyncpg.InvalidAuthorizationSpecificationError,
                  asyncpg.InvalidCatalogNameError, asyncpg.InsufficientResourcesError,
                  asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
                  asyncpg.CannotConnectNowError)


def answered_with_error(error: BaseException) -> bool:
    """Whether PostgreSQL itself answered the statement with an error (a cast that failed,
    a bad pattern, a timeout it enforced): the connection is then as good as before, unlike
    after a lost or refused connection, which has no SQLSTATE or one of `_NOT_CONNECTED`."""
    driver = _driver_error(error)
    return (isinstance(driver, asyncpg.PostgresError)
            and not isinstance(driver, _NOT_CONNECTED) and sqlstate(driver) is not None)


def describe(error: BaseException) -> str:
    """What is wrong with the database, in words that name no user, host or SQL."""
    error = _driver_error(error)
    if isinstance(error, sa_exc.TimeoutError):
        return "the server is busy: no database connection came free in time"
    if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):
        return "it refused the server's credentials"
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return "the configured database does not exist"
    if isinstance(error, asyncpg.TooManyConnectionsError):
        return "it accepts no more connections"
    if isinstance(error, asyncpg.InsufficientResourcesError):
        return "it is short of resources"
    if isinstance(error, asyncpg.AdminShutdownError | asyncpg.CrashShutdownError
                  | asyncpg.CannotConnectNowError):
        return "it is shutting down or starting up"
    if isinstance(error, TimeoutError):
        return "it did not answer in time"
    if getattr(error, "readable", False):
        return str(error)  # the app's own words (audit.AuditUnavailable)
    if isinstance(error, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
                  | sa_exc.DBAPIError):
        return "it cannot be reached"
    # The app's own explanations (a missing table, say) are meant to be read.
    return str(error) if type(error) is RuntimeError else "it failed"


def without_paths(error: BaseException) -> str:
    """An unexpected failure in words a client may read: an OSError's own words without
    the file names it carries (server paths), the database's as database_error() puts
    them, anything else by its type alone. The caller logs the detail."""
    if isinstance(error, ApiError):
        return error.message
    if isinstance(error, DRIVER_ERRORS):
        return database_error(error).message
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return f"internal error: {type(error).__name__}"


def database_error(error: BaseException, what: str = "the database") -> ApiError:
    """504 for a query the database cancelled, 502 for one it refused, else 503."""
    error = _driver_error(error)
    if isinstance(error, asyncpg.QueryCanceledError):
        return ApiError(504, f"the query was cancelled by the database: "
                             f"{postgres_message(error)}", code=sqlstate(error))
    if isinstance(error, asyncpg.PostgresError) and not isinstance(error, _NOT_CONNECTED):
        return ApiError(502, f"the database could not run the query: "
                             f"{postgres_message(error)}", code=sqlstate(error))
    return unavailable(error, what)
