"""docs/pulls.md's scheduled-pull recipes, run exactly as printed: data holding U+2028 and
U+0085, a connection dropped halfway, reruns, rows changed between runs. Every run's
file is whole or absent, the cursor moves only with a whole file, and the files read in
order give the table (the last version of each key)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.dropper import DroppingProxy
from tests.support import Server, fetch, run_sql
from tests.test_access import new_token

PULLS = Path(__file__).resolve().parent.parent / "docs" / "pulls.md"
ROWS = 10_000
# Values a line splitter other than b"\n" cuts in two, and JSON's own escapes.
ODD = "line\u2028separator, next\u0085line, tab\t, quote \" and back\\slash"


def recipe(name: str) -> str:
    """The code block of docs/pulls.md that follows `<!-- recipe: NAME -->`."""
    text = PULLS.read_text(encoding="utf-8")
    found = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```\w+\n(.*?)\n```\n", text,
                      re.DOTALL)
    assert found, f"docs/pulls.md has no recipe {name}"
    return found.group(1) + "\n"


@pytest.fixture
def table(database_url: str) -> Any:
    name = f"pull_{uuid.uuid4().hex[:8]}"
    run_sql(database_url,
            f"CREATE TABLE exports.{name} (id bigint PRIMARY KEY, note text NOT NULL,"
            " version int NOT NULL DEFAULT 1)",
            f"INSERT INTO exports.{name} (id, note) SELECT g, CASE WHEN g % 7 = 0 THEN"
            f" '{ODD}' || g ELSE repeat(md5(g::text), 3) END"
            f" FROM generate_series(1, {ROWS}) g")
    yield name
    run_sql(database_url, f"DROP TABLE exports.{name}")


def table_rows(database_url: str, table: str) -> dict[int, dict[str, Any]]:
    rows = fetch(database_url, f"SELECT row_to_json(t)::text AS j FROM exports.{table} t")
    return {r["id"]: r for r in (json.loads(row["j"]) for row in rows)}


def pulled(folder: Path, dataset: str) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """Rows per file (in order), and the last version of each key."""
    counts: list[int] = []
    latest: dict[int, dict[str, Any]] = {}
    for path in sorted((folder / "pulls").glob(f"{dataset}-*.ndjson")):
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"", f"{path.name} does not end with a whole row"
        counts.append(len(lines) - 1)
        for line in lines[:-1]:
            row = json.loads(line)
            latest[row["id"]] = row
    return counts, latest


@pytest.mark.parametrize("script", [
    pytest.param("pull.sh", marks=pytest.mark.needs("curl")),
    "pull.py",
])
def test_the_readme_pull_survives_odd_data_a_dropped_connection_and_reruns(
    script: str, server: Server, database_url: str, table: str, tmp_path: Path
) -> None:
    (tmp_path / script).write_text(recipe(script), encoding="utf-8")
    token = new_token(database_url, f"pull-{uuid.uuid4().hex[:8]}", "datasets:*")
    command = ["sh", script] if script.endswith(".sh") else [sys.executable, script]
    cursor = tmp_path / f"{table}.cursor"

    def run(base: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "EXPORTER_URL": base, "EXPORTER_TOKEN": token,
               "DATASET": table}
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    def leftovers() -> list[str]:
        return sorted(p.name for p in (tmp_path / "pulls").iterdir()
                      if p.name.startswith("."))

    # The first pull (the whole table) is cut halfway: nothing kept, no cursor.
    with DroppingProxy(server.port, cut_after=150_000) as proxy:
        broken = run(proxy.url)
    assert proxy.cut == 1
    assert broken.returncode != 0, broken
    assert pulled(tmp_path, table)[0] == [] and leftovers() == [] and not cursor.exists()

    # Rerun: all of it, and a cursor.
    whole = run(server.url)
    assert whole.returncode == 0, whole.stderr
    first = cursor.read_text()
    counts, latest = pulled(tmp_path, table)
    assert counts == [ROWS] and latest == table_rows(database_url, table)
    assert any("\u2028" in r["note"] and "\u0085" in r["note"] for r in latest.values())

    # Changes, then a pull cut before its end: again nothing kept, the cursor unmoved.
    run_sql(database_url,
            f"UPDATE exports.{table} SET note = '{ODD}' || id, version = version + 1"
            " WHERE id % 1000 = 1",
            f"INSERT INTO exports.{table} (id, note)"
            f" SELECT g, '{ODD}' FROM generate_series({ROWS + 1}, {ROWS + 30}) g")
    with DroppingProxy(server.port, cut_after=300) as proxy:
        broken = run(proxy.url)
    assert broken.returncode != 0 and cursor.read_text() == first
    assert pulled(tmp_path, table)[0] == [ROWS] and leftovers() == []

    # The rerun gets exactly the changed rows; one more gets none.
    assert run(server.url).returncode == 0
    assert run(server.url).returncode == 0
    counts, latest = pulled(tmp_path, table)
    assert counts == [ROWS, ROWS // 1000 + 30, 0]
    assert latest == table_rows(database_url, table)
    assert cursor.read_text() != first


@pytest.mark.parametrize("script", [
    pytest.param("pull.sh", marks=pytest.mark.needs("curl")),
    "pull.py",
])
def test_the_pull_recipes_print_the_servers_reason_for_a_refusal(
    script: str, server: Server, database_url: str, tmp_path: Path
) -> None:
    """A cursor the server refuses (as after `exporter link rotate-key`): the run fails
    with the server's JSON reason on stderr, not only curl's exit status, and keeps the
    cursor it had."""
    (tmp_path / script).write_text(recipe(script), encoding="utf-8")
    token = new_token(database_url, f"pull-{uuid.uuid4().hex[:8]}", "datasets:*")
    cursor = tmp_path / "orders.cursor"
    cursor.write_text("not-a-cursor\n")
    command = ["sh", script] if script.endswith(".sh") else [sys.executable, script]
    env = {**os.environ, "EXPORTER_URL": server.url, "EXPORTER_TOKEN": token,
           "DATASET": "orders"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert '"status":400' in done.stderr and '"parameter":"since"' in done.stderr, done.stderr
    assert cursor.read_text() == "not-a-cursor\n"
    assert sorted(p.name for p in (tmp_path / "pulls").iterdir()) == []
