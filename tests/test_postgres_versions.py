"""PostgreSQL 13 and newer are served, older ones refused at start in one line.

This module runs on every server of `--postgres` (the embedded one and Debian's
postgresql-15 by default): acceptance is checked for real on each. No server older
than 13 is at hand, so the refusal is checked with the decision's numbers, and end to
end by raising the oldest supported version above the server's own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from exporter.config import Settings
from exporter.db import OLDEST_SUPPORTED, check_server_version, create_engine, version_refusal
from tests.conftest import EMBEDDED
from tests.support import ROOT, bytecode_env, fetch, free_port


@pytest.mark.parametrize(("number", "version"), [
    (90624, "9.6.24"), (100023, "10.23"), (120022, "12.22"), (129999, "12.9999"),
    (130000, "13.0"),
])
def test_versions_before_13_are_refused_in_one_line(number: int, version: str) -> None:
    refusal = version_refusal(number, version)
    if number >= 130000:
        assert refusal is None
        return
    assert refusal == (f"PostgreSQL {version} is not supported: exporter needs PostgreSQL 13"
                       " or newer")


@pytest.mark.parametrize(("number", "version"), [
    (130000, "13.0"), (130022, "13.22"), (150014, "15.14"), (160010, "16.10"),
    (170006, "17.6"), (180001, "18.1"), (190000, "19devel"),
])
def test_versions_from_13_on_are_accepted(number: int, version: str) -> None:
    assert OLDEST_SUPPORTED == 130000
    assert version_refusal(number, version) is None


def version_num(url: str) -> int:
    return int(fetch(url, "SHOW server_version_num")[0][0])


def test_the_server_is_the_version_asked_for(
    request: pytest.FixtureRequest, database_url: str
) -> None:
    asked = request.node.callspec.params["server_url_root"]
    number = version_num(database_url)
    if asked == EMBEDDED:
        assert number >= OLDEST_SUPPORTED
    else:
        assert number // 10000 == int(asked)


def test_the_check_accepts_the_server_and_sets_the_session(database_url: str) -> None:
    """The app's own connections pass the check and carry every session setting, the
    ones set after connecting (new in 14) included."""
    async def go() -> tuple[int, str, str]:
        engine = create_engine(Settings(), database_url)
        try:
            async with engine.connect() as conn:
                number = await check_server_version(conn)
                interval = (await conn.exec_driver_sql(
                    "SHOW client_connection_check_interval")).scalar_one()
                zone = (await conn.exec_driver_sql("SHOW timezone")).scalar_one()
                return number, interval, zone
        finally:
            await engine.dispose()

    number, interval, zone = asyncio.run(go())
    assert number == version_num(database_url)
    assert (interval, zone) == ("500ms", "UTC")


def run_raised(oldest: int, code: str, env_url: str, timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
    """Python code run with the oldest supported version raised to `oldest`."""
    prelude = f"import exporter.db as db; db.OLDEST_SUPPORTED = {oldest}; "
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "EXPORTER_DATABASE_URL": env_url,
             "PYTHONUNBUFFERED": "1", **bytecode_env()},
    )


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_a_server_too_old_stops_the_command_with_one_line(
    database_url: str, command: str
) -> None:
    number = version_num(database_url)
    newer = (number // 10000 + 1) * 10000
    port = free_port()
    args = ["migrate"] if command == "migrate" else ["serve", "--port", str(port)]
    done = run_raised(newer, f"from exporter.cli import main; main({args!r})", database_url)
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith("\n") and done.stderr.count("\n") == 1, done.stderr
    version = fetch(database_url, "SHOW server_version")[0][0]
    assert done.stderr == (f"exporter: PostgreSQL {version} is not supported: exporter needs"
                           f" PostgreSQL {newer // 10000} or newer\n")
    assert "Traceback" not in done.stdout + done.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    # and the same command with the real limit goes through
    assert run_raised(OLDEST_SUPPORTED, "from exporter.cli import main; main(['migrate'])",
                      database_url).returncode == 0


def test_uvicorn_running_the_app_refuses_a_server_too_old_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    """Without `exporter serve` (uvicorn or gunicorn loading the app), the lifespan
    checks: one line, no traceback, no server, uvicorn's status for a failed start."""
    number = version_num(database_url)
    newer = (number // 10000 + 1) * 10000
    port = free_port()
    started = time.monotonic()
    done = run_raised(
        newer, "import uvicorn; uvicorn.main(['--factory', 'exporter.app:create_app',"
        f" '--host', '127.0.0.1', '--port', '{port}'])", database_url,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 3, output
    assert time.monotonic() - started < 30
    assert "Traceback" not in output
    refusals = [line for line in output.splitlines() if "is not supported" in line]
    assert len(refusals) == 1, output
    version = fetch(database_url, "SHOW server_version")[0][0]
    assert refusals[0].endswith(f"exporter: PostgreSQL {version} is not supported: exporter"
                                f" needs PostgreSQL {newer // 10000} or newer")
    assert "Application startup failed" in output
    assert "Uvicorn running" not in output


@pytest.mark.parametrize("ci", ["true", ""], ids=["in-ci", "outside-ci"])
def test_a_missing_postgres_skips_with_the_reason_but_fails_in_ci(
    tmp_path: Path, ci: str
) -> None:
    """A version whose Debian package is not installed (99): outside CI its tests are
    skipped, saying why; in CI they fail, so a run never passes without them."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_postgres_versions.py", "-q", "-rs",
         "-p", "no:cacheprovider", "--postgres", "99", f"--basetemp={tmp_path / 'run'}",
         "-k", "the_server_is_the_version_asked_for"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        # No plugins from entry points (Schemathesis, Hypothesis, Playwright): the test
        # chosen needs none, and importing them is most of the inner run's start-up.
        env={"PATH": "/usr/bin:/bin", "CI": ci, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
             **bytecode_env()},
    )
    assert "postgresql-99 is not installed" in done.stdout, done.stdout
    if ci:
        assert done.returncode == 1, done.stdout
        assert "in CI the tests on PostgreSQL 99 must run" in done.stdout
        assert "1 error" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        assert "1 skipped" in done.stdout
