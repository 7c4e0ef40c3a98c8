"""PostgREST's clients as they come, against a real server: postgrest-py at the version
the project pins and at the newest (from a virtualenv of its own: two versions cannot
share one), and `@supabase/postgrest-js` (newest, what supabase-js uses) under node, each
created the way its README shows. Each runs tests/clients/ for select, eq, or, order,
range with a count, and an error; every answer is compared with the same SQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Server, fetch
from tests.test_access import new_token
from tests.test_postgrest import rows_of

CLIENTS = ROOT / "tests" / "clients"
NEWEST_PY = "postgrest>=2.34"  # 2.34 fills APIError from PostgREST's top-level fields
INSTALL_TIMEOUT = 300


@pytest.fixture(scope="session")
def newest_postgrest_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The newest postgrest-py, in a virtualenv made once per session outside the
    checkout: its Python."""
    folder = tmp_path_factory.mktemp("postgrest-py-newest")
    # Without a pip of its own: this pip installs into it (a quarter of the time).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True,
                   timeout=INSTALL_TIMEOUT)
    python = folder / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    NEWEST_PY], check=True, timeout=INSTALL_TIMEOUT, capture_output=True)
    return python


@pytest.fixture(scope="session")
def postgrest_js(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The newest @supabase/postgrest-js, installed by npm once per session into a
    temporary folder outside the checkout: that folder."""
    folder = tmp_path_factory.mktemp("postgrest-js")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix",
                    str(folder), "@supabase/postgrest-js"], check=True,
                   timeout=INSTALL_TIMEOUT, capture_output=True,
                   env={**os.environ, "npm_config_cache": str(folder / ".npm-cache")})
    return folder


@pytest.fixture(scope="module")
def token(database_url: str) -> str:
    return new_token(database_url, f"clients-{os.urandom(3).hex()}", "datasets:*")


def version(python: Path | str) -> str:
    out = subprocess.run([str(python), "-c", "from importlib.metadata import version;"
                          " print(version('postgrest'))"], capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def run(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answers: dict[str, Any] = json.loads(done.stdout)
    return answers


def by_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: r["id"])


def assert_answers(answers: dict[str, Any], database_url: str) -> None:
    # No order asked: PostgREST promises none either.
    assert by_id(answers["select"]) == rows_of(
        database_url, "SELECT id, customer, amount FROM exports.orders WHERE id < 6 ORDER BY id")
    assert answers["eq"] == rows_of(database_url, "SELECT * FROM exports.orders WHERE id = 7")
    assert answers["or"] == rows_of(database_url, "SELECT id FROM exports.orders"
                                                  " WHERE id = 5 OR id > 19998 ORDER BY id")
    assert answers["order"] == rows_of(database_url, "SELECT id, amount FROM exports.orders"
                                                     " WHERE id < 20 ORDER BY amount DESC, id")
    assert answers["range"]["count"] == fetch(
        database_url, "SELECT count(*) FROM exports.orders WHERE id >= 1000")[0][0]
    assert answers["range"]["data"] == rows_of(
        database_url, "SELECT id FROM exports.orders WHERE id >= 1000 ORDER BY id"
                      " LIMIT 10 OFFSET 10")
    # The error as the client shows it: our message, PostgREST's code for a query string
    # it cannot read, the parameter at fault.
    error = answers["error"]
    assert error["message"] == ("'not-a-number' is not a valid bigint for column 'id':"
                                ' invalid input syntax for type bigint: "not-a-number"')
    assert error["code"] == "PGRST100" and error["details"] == "parameter: id"
    assert error["hint"] is None


@pytest.mark.parametrize("style", ["auth", "headers"])
def test_postgrest_py_pinned(server: Server, database_url: str, token: str,
                             style: str) -> None:
    """The version pyproject.toml's test extra installs (constraints.txt pins it)."""
    assert version(sys.executable).startswith("2.")
    answers = run([sys.executable, str(CLIENTS / "postgrest_py.py"),
                   server.url + "/datasets", token, style])
    assert_answers(answers, database_url)


@pytest.mark.parametrize("style", ["auth", "headers"])
def test_postgrest_py_newest(server: Server, database_url: str, token: str,
                             newest_postgrest_py: Path, style: str) -> None:
    assert tuple(int(p) for p in version(newest_postgrest_py).split(".")[:2]) >= (2, 34)
    answers = run([str(newest_postgrest_py), str(CLIENTS / "postgrest_py.py"),
                   server.url + "/datasets", token, style])
    assert_answers(answers, database_url)


@pytest.mark.needs("node", "npm")
def test_postgrest_js_newest(server: Server, database_url: str, token: str,
                             postgrest_js: Path) -> None:
    """postgrest-js sends `Accept: */*`: JSON, as from PostgREST (it was CSV, so every
    read came back as CSV text in `error.message`)."""
    answers = run(["node", str(CLIENTS / "postgrest_js.mjs"), str(postgrest_js),
                   server.url + "/datasets", token])
    assert_answers(answers, database_url)
    assert answers["error"]["status"] == 400
