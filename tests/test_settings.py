"""Settings that explain themselves: a mistake is one line naming the variable and exit
status 2; an unreachable database is one line and a non-zero exit; libpq URL parameters
reach the driver; the password appears nowhere."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from exporter.config import Settings
from exporter.db import connect_arguments, create_engine
from tests.support import ROOT, FreshDatabase, exporter_cli, fetch, forked, free_port, wait_until

PASSWORD = "Pa55-never-printed-7c1e"


def exporter(*args: str, env: dict[str, str], cwd: Path = ROOT,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m exporter.cli ARGS`, a real process, with only the EXPORTER_ variables of
    `env`: for what only a process shows (its logging set up, writing to its stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    # A port of its own: `serve` checks its port before anything else, and 8000 may be
    # another program's on this machine.
    clean["EXPORTER_PORT"] = str(free_port())
    return subprocess.run([*forked("exporter.cli"), *args], cwd=cwd,
                          env={**clean, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def in_process(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`exporter` as above, run in this process as a process of its own would run it
    (tests.support.exporter_cli): the same stdout, stderr and status without a Python
    start-up."""
    return exporter_cli(*args, env={"EXPORTER_PORT": str(free_port()), **env}, cwd=cwd,
                        as_process=True)


def with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


UNREACHABLE = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/db"


@pytest.mark.parametrize(("env", "variable"), [
    ({"EXPORTER_FILE_CHUNK_SIZE": str(2 * 1024 * 1024),
      "EXPORTER_FILE_CHUNK_SIZE_MAX": str(1024 * 1024)}, "EXPORTER_FILE_CHUNK_SIZE"),
    ({"EXPORTER_STATEMENT_TIMEOUT": "0"}, "EXPORTER_STATEMENT_TIMEOUT"),
    ({"EXPORTER_EXPORT_FLUSH_INTERVAL": "-1"}, "EXPORTER_EXPORT_FLUSH_INTERVAL"),
    ({"EXPORTER_EXPORT_CHUNK_SIZE": "0"}, "EXPORTER_EXPORT_CHUNK_SIZE"),
    ({"EXPORTER_EXPORT_BUFFER_CHUNKS": "0"}, "EXPORTER_EXPORT_BUFFER_CHUNKS"),
    ({"EXPORTER_POOL_SIZE": "0"}, "EXPORTER_POOL_SIZE"),
    ({"EXPORTER_POOL_MAX_OVERFLOW": "-1"}, "EXPORTER_POOL_MAX_OVERFLOW"),
    ({"EXPORTER_PORT": "http"}, "EXPORTER_PORT"),
    ({"EXPORTER_PORT": "70000"}, "EXPORTER_PORT"),
    ({"EXPORTER_SCHEMA": "exporter"}, "EXPORTER_SCHEMA"),
    ({"EXPORTER_SCHEMA": "pg_catalog"}, "EXPORTER_SCHEMA"),
    ({"EXPORTER_PUBLIC_DATASETS": "[orders"}, "EXPORTER_PUBLIC_DATASETS"),
    ({"EXPORTER_DATABASE_URL": f"mysql://app:{PASSWORD}@localhost/db"},
     "EXPORTER_DATABASE_URL"),
    ({"EXPORTER_DATABASE_URL": f"postgresql://app:{PASSWORD}@localhost:99999/db"},
     "EXPORTER_DATABASE_URL"),
    ({"EXPORTER_DATABASE_URL": f"not a url {PASSWORD}"}, "EXPORTER_DATABASE_URL"),
    ({"EXPORTER_DATABASE_URL": f"postgresql://app:{PASSWORD}@localhost/db?sslmode=maybe"},
     "EXPORTER_DATABASE_URL"),
    ({"EXPORTER_DATABASE_URL": f"postgresql://app:{PASSWORD}@h/db?connect_timeout=soon"},
     "EXPORTER_DATABASE_URL"),
    ({"EXPORTER_DATABASE_URL": f"postgresql://app:{PASSWORD}@h/db?options=-x"},
     "EXPORTER_DATABASE_URL"),
])
def test_a_bad_setting_is_one_line_naming_the_variable_and_exit_2(
        env: dict[str, str], variable: str, tmp_path: Path) -> None:
    check_one_line(in_process("serve", env={"EXPORTER_DATA_DIR": str(tmp_path / "var"),
                                            **env}, cwd=tmp_path),
                   variable, tmp_path)


def test_a_bad_setting_stops_the_real_process_in_one_line(tmp_path: Path) -> None:
    """The cases above run in this process: once as the process a user starts, whose
    stderr and exit status these are."""
    env = {"EXPORTER_DATA_DIR": str(tmp_path / "var"),
           "EXPORTER_DATABASE_URL": f"postgresql://app:{PASSWORD}@localhost/db?sslmode=maybe"}
    check_one_line(exporter("serve", env=env, cwd=tmp_path, timeout=30),
                   "EXPORTER_DATABASE_URL", tmp_path)


@pytest.mark.parametrize("command", [["migrate"], ["token", "list"], ["downloads"],
                                     ["digest"], ["demo"], ["link", "/files/a"]])
def test_every_command_checks_the_settings_first(command: list[str], tmp_path: Path) -> None:
    env = {"EXPORTER_DATA_DIR": str(tmp_path / "var"), "EXPORTER_SCHEMA": "exporter"}
    check_one_line(in_process(*command, env=env, cwd=tmp_path),
                   "EXPORTER_SCHEMA", tmp_path)


def check_one_line(done: subprocess.CompletedProcess[str], variable: str,
                   tmp_path: Path) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"exporter: {variable}"), lines
    assert "Traceback" not in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    # Nothing was started: no embedded database, no files.
    assert not (tmp_path / "var").exists()


def test_settings_in_range_are_accepted() -> None:
    settings = Settings(file_chunk_size=1024 * 1024, file_chunk_size_max=1024 * 1024,
                        statement_timeout=0.5, pool_max_overflow=0)
    assert settings.file_chunk_size == settings.file_chunk_size_max


@pytest.mark.parametrize("command", [["serve"], ["migrate"], ["token", "list"],
                                     ["downloads"], ["digest"], ["demo", "--rows", "1"]])
def test_an_unreachable_database_is_one_line_and_a_non_zero_exit(
        command: list[str], tmp_path: Path) -> None:
    # In process; test_a_database_that_does_not_exist_is_one_line runs `serve` for real.
    done = in_process(*command, env={"EXPORTER_DATABASE_URL": UNREACHABLE}, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"exporter {command[0]}: cannot use the database"
                               " postgresql://app:***@127.0.0.1:"), lines
    assert "refused" in lines[0].lower() or "connect call failed" in lines[0].lower()
    assert PASSWORD not in done.stdout + done.stderr


def test_a_database_that_does_not_exist_is_one_line(server_url_root: str) -> None:
    url = with_password(make_url(server_url_root).set(database="no_such_db_4d2a")
                        .render_as_string(hide_password=False))
    done = exporter("serve", env={"EXPORTER_DATABASE_URL": url}, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no_such_db_4d2a" in lines[0] and "does not exist" in lines[0]
    assert PASSWORD not in done.stdout + done.stderr


def test_libpq_sslmode_and_application_name_reach_the_server(
        server_url_root: str, make_server: type, database_url: str) -> None:
    """`?sslmode=disable&application_name=...` in EXPORTER_DATABASE_URL: the server starts
    (asyncpg would reject `sslmode` as an argument) and its connections carry the name."""
    name = f"exporter-settings-{os.urandom(3).hex()}"
    url = make_url(with_password(database_url)).update_query_dict(
        {"sslmode": "disable", "application_name": name}).render_as_string(hide_password=False)
    server = make_server(url=url).start()
    response = httpx.get(server.url + "/datasets/orders.csv?limit=3")
    assert response.status_code == 200, response.text
    assert len(list(csv.reader(io.StringIO(response.text)))) == 4

    def connected() -> bool:
        rows = fetch(database_url, "SELECT datname FROM pg_stat_activity"
                     " WHERE application_name = $1", name)
        return bool(rows) and all(r["datname"] == make_url(database_url).database
                                  for r in rows)

    assert wait_until(connected, 10)
    server.stop()
    assert PASSWORD not in server.log()


def test_libpq_options_and_connect_timeout_reach_the_driver(database_url: str) -> None:
    url = make_url(database_url).update_query_dict({
        "options": "-c search_path=exports,public -c statement_timeout=4321",
        "connect_timeout": "7", "application_name": "exporter-options",
    }).render_as_string(hide_password=False)
    target, arguments = connect_arguments(url)
    assert arguments["timeout"] == 7.0
    for gone in ("options", "connect_timeout", "application_name", "sslmode"):
        assert gone not in make_url(target).query

    async def show() -> list[str]:
        engine = create_engine(Settings(), url)
        try:
            async with engine.connect() as conn:
                return [str((await conn.execute(text(f"SHOW {name}"))).scalar())
                        for name in ("search_path", "statement_timeout", "application_name",
                                     "timezone")]
        finally:
            await engine.dispose()

    # The URL's options come on top of the app's own session settings (timezone UTC).
    assert asyncio.run(show()) == ["exports,public", "4321ms", "exporter-options", "UTC"]


def test_sslmode_require_and_sslrootcert_build_a_verifying_context(tmp_path: Path) -> None:
    import ssl

    assert connect_arguments("postgresql://h/db?sslmode=require")[1]["ssl"] == "require"
    assert "ssl" not in connect_arguments("postgresql://h/db")[1]
    missing = tmp_path / "no-such-root.crt"
    with pytest.raises(FileNotFoundError):
        connect_arguments(f"postgresql://h/db?sslmode=verify-full&sslrootcert={missing}")
    context = connect_arguments(
        f"postgresql://h/db?sslmode=verify-ca&sslrootcert={ssl.get_default_verify_paths().cafile}"
    )[1]["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname


def test_demo_leaves_a_chosen_files_root_alone(server_url_root: str, tmp_path: Path) -> None:
    chosen = tmp_path / "their-files"
    chosen.mkdir()
    (chosen / "keep.txt").write_text("theirs\n")
    with FreshDatabase(server_url_root) as url:
        env = {"EXPORTER_DATABASE_URL": url, "EXPORTER_FILES_ROOT": str(chosen)}

        def demo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return in_process("demo", "--rows", "10", "--file-size", "1K", *args, env=env,
                              cwd=tmp_path)

        done = demo(env=env)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in chosen.iterdir()) == ["keep.txt"]
        assert "--files" in done.stdout
        assert fetch(url, "SELECT count(*) AS n FROM exports.orders")[0]["n"] == 10
        # Asked to, it does write there (and leaves the other files alone).
        done = demo("--files", env=env)
        assert done.returncode == 0, done.stderr
        assert (chosen / "README.txt").exists() and (chosen / "keep.txt").exists()
        # The default root (var/files under the working directory) is the demo's own.
        done = demo(env={"EXPORTER_DATABASE_URL": url})
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "var" / "files" / "README.txt").exists()
