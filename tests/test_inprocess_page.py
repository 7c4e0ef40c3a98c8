"""The page's own inputs and what it derives, in process: `?page=` of a folder (hostile
numbers included), folders first, sizes, the SHA-256 in hex and the line that checks it,
the builder's data (value fields by type, the default order). tests/test_page.py drives
the same page in Chromium."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.config import Settings
from exporter.web import page
from tests.inprocess import InProcess
from tests.support import run_sql
from tests.test_access import new_token

FILES = 1005  # one more page than FOLDER_ENTRIES
XSS = "<img src=x onerror=alert(1)>'\"$(id).txt"
# A dataset name a shell would read (a token's scope may hold anything but spaces and /).
HOSTILE_VIEW = "\u2039img<b>'\"x$(id)`id`;*&|"


def quoted_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def arguments(command: str, env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """A command as the page shows it, run by `sh` with its program replaced by printf:
    the program's name, and the arguments exactly as the program would get them."""
    program, _, rest = command.partition(" ")
    done = subprocess.run(["sh", "-c", "printf '%s\\n' " + rest], capture_output=True,
                          text=True, timeout=30, env={"PATH": os.environ["PATH"], **(env or {})})
    assert done.returncode == 0 and done.stderr == "", (command, done.stderr)
    return program, done.stdout.splitlines()


@pytest.fixture(scope="module")
def app(database_url: str, files_root: Path) -> Iterator[InProcess]:
    folder = files_root / "paged"
    folder.mkdir()
    for i in range(FILES):
        (folder / f"a{i:04d}.bin").write_bytes(b"")
    (folder / "zz").mkdir()
    (files_root / "nested" / XSS).write_bytes(b"x")
    settings = Settings(database_url=database_url, files_root=files_root,
                        public_datasets=["*"], public_files=["*"])
    try:
        with InProcess(settings) as running:
            yield running
    finally:
        shutil.rmtree(folder)
        (files_root / "nested" / XSS).unlink()


def names(html: str) -> list[str]:
    return re.findall(r'<td class="name"><a href="[^"]*"(?: download)?>([^<]*)</a>', html)


@pytest.mark.parametrize("raw, shown", [
    ("1", 1), ("2", 2), ("0", 1), ("-1", 1), ("abc", 1), ("", 1), ("1.5", 1), ("٢", 1),
    ("9" * 5000, page.MAX_PAGE), ("3", 3), ("0002", 2),
])
def test_page_numbers(app: InProcess, raw: str, shown: int) -> None:
    r = app.get("/", params={"path": "paged/", "page": raw})
    assert r.status_code == 200
    assert f"Page {shown} of 2" in r.text
    listed = names(r.text)
    if shown == 1:
        assert listed[0] == "zz/" and listed[1] == "a0000.bin" and len(listed) == 1000
        assert "Showing the first 1000 of 1006 entries" in r.text
        assert 'rel="next" href="/?path=paged/&amp;page=2#files"' in r.text
    elif shown == 2:
        assert listed == [f"a{i:04d}.bin" for i in range(999, FILES)]
        assert "Showing entries 1001 to 1006 of 1006" in r.text
        assert 'rel="prev" href="/?path=paged/&amp;page=1#files"' in r.text
    else:  # past the end: said so, with a way back
        assert listed == []
        assert f"Page {shown} is past the end: this folder has 2 pages." in r.text
        assert 'rel="prev" href="/?path=paged/&amp;page=2#files"' in r.text


def test_many_page_parameters_take_the_last(app: InProcess) -> None:
    r = app.get("/?path=paged/&page=1&page=2")
    assert r.status_code == 200 and "Page 2 of 2" in r.text


def test_a_small_folder_has_no_pages(app: InProcess) -> None:
    r = app.get("/", params={"path": "nested/"})
    assert r.status_code == 200 and 'class="pages"' not in r.text
    past = app.get("/", params={"path": "nested/", "page": "7"})
    assert "Page 7 is past the end: this folder has 1 page." in past.text
    assert 'rel="prev" href="/?path=nested/&amp;page=1#files"' in past.text


def test_sha256_in_hex_and_the_line_that_checks_it(tmp_path: Path) -> None:
    body = b"bytes of a file\n"
    digest = hashlib.sha256(body)
    listed = f"sha-256=:{base64.b64encode(digest.digest()).decode()}:"
    assert page.sha256_hex(listed) == digest.hexdigest()
    for bad in [None, "", "sha-256=:", "sha-256=:!!!:", "sha-512=:AAAA:",
                f"sha-256=:{base64.b64encode(b'short').decode()}:", "sha-256=:" + "A" * 10_000]:
        assert page.sha256_hex(bad) is None
    # Names a shell would read otherwise: quotes, spaces, $, a leading dash.
    for name in ["plain.txt", "O'Brien & Sons.csv", "$HOME `x`.txt", "-n.txt", "a  b.txt"]:
        (tmp_path / name).write_bytes(body)
        line = page.check_line(digest.hexdigest(), name)
        done = subprocess.run(["sh", "-c", line], cwd=tmp_path, capture_output=True, timeout=30)
        assert done.returncode == 0 and done.stdout == f"{name}: OK\n".encode(), (line, done)
        (tmp_path / name).write_bytes(body + b"changed")
        failed = subprocess.run(["sh", "-c", line], cwd=tmp_path, capture_output=True,
                                timeout=30)
        assert failed.returncode == 1


def test_builder_data_fits_the_columns(app: InProcess) -> None:
    r = app.get("/")
    match = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', r.text,
                      re.S)
    assert match is not None
    data = json.loads(match[1])
    orders = next(d for d in data["datasets"] if d["name"] == "orders")
    inputs = {c["name"]: c["input"] for c in orders["columns"]}
    assert inputs == {"id": "number", "customer": "text", "amount": "number",
                      "created_at": "datetimetz", "updated_at": "datetimetz",
                      "ship_date": "date", "paid": "boolean", "order_uuid": "text",
                      "details": "text", "tags": "text", "note": "text"}
    assert orders["default_order"] == ["id"]  # the primary key
    # Each column is offered the conditions its type has.
    offered = {c["name"]: set(c["operators"]) for c in orders["columns"]}
    assert {"eq", "gt", "in", "is"} <= offered["id"] and not {"cs", "match", "fts"} & offered["id"]
    assert {"match", "ilike", "fts", "gt"} <= offered["customer"]
    assert "cs" not in offered["customer"]
    assert {"cs", "cd", "ov"} <= offered["tags"] and "gt" not in offered["paid"]
    assert {"cs", "cd"} <= offered["details"] and "eq" in offered["details"]
    revenue = next(d for d in data["datasets"] if d["name"] == "daily_revenue")
    assert revenue["default_order"] == ["day"]  # a view: its first column
    assert {k["value"] for k in data["operands"]["is"]["keywords"]} >= {"null", "not_null"}
    assert data["operands"]["in"]["kind"] == "list"
    assert r.headers["cache-control"] == "no-store"


def test_a_composite_key_keeps_its_order(app: InProcess, database_url: str) -> None:

    run_sql(database_url, "CREATE TABLE exports.keyed (a int, b int, c text,"
                          " PRIMARY KEY (b, a))")
    try:
        r = app.get("/")
        data = json.loads(re.search(
            r'id="page-data">(.*?)</script>', r.text, re.S)[1])  # type: ignore[index]
        keyed = next(d for d in data["datasets"] if d["name"] == "keyed")
        assert keyed["default_order"] == ["b", "a"]
    finally:
        run_sql(database_url, "DROP TABLE exports.keyed")


def test_names_are_text_never_markup(app: InProcess) -> None:
    r = app.get("/", params={"path": "nested/"})
    assert r.status_code == 200
    assert "<img src=x" not in r.text
    assert "&lt;img src=x onerror=alert(1)&gt;&#39;&#34;$(id).txt" in r.text


def test_every_command_on_the_page_is_shell_quoted(app: InProcess, database_url: str) -> None:
    """The token hint printed `--scope datasets:<name>` unquoted, so a view named with
    quotes and $( ) broke the command or ran more than it said. Every command of the page,
    run by sh, now hands its program the arguments it shows (the program replaced by
    printf): the hint's scope, and curl's and wget's URL, the download link's own."""
    run_sql(database_url, f"CREATE VIEW exports.{quoted_ident(HOSTILE_VIEW)} AS SELECT 1 AS id")
    try:
        token = new_token(database_url, f"hostile-{os.urandom(3).hex()}",
                          f"datasets:{HOSTILE_VIEW}")
        r = app.get("/", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        commands = {cls: html.unescape(text) for cls, text in re.findall(
            r'<pre class="cmd ([\w-]+)">(.*?)</pre>', r.text, re.S)}
        assert set(commands) == {"token-cmd", "curl", "wget"}, commands
        assert arguments(commands["token-cmd"]) == ("exporter", [
            "token", "create", "--name", "YOUR-NAME", "--scope", f"datasets:{HOSTILE_VIEW}",
            "--expires", "90d"])
        link = html.unescape(re.findall(r'<a class="button export" data-format="[a-z]+"'
                                        r' href="([^"]*)"', r.text)[0])
        assert HOSTILE_VIEW not in link and "/datasets/" in link  # percent-encoded
        header = "Authorization: Bearer exp_secret"
        secret = {"EXPORTER_TOKEN": "exp_secret"}
        assert arguments(commands["curl"], secret) == ("curl", ["-fOJ", "-H", header, link])
        assert arguments(commands["wget"], secret) == (
            "wget", ["--content-disposition", f"--header={header}", link])
    finally:
        run_sql(database_url, f"DROP VIEW exports.{quoted_ident(HOSTILE_VIEW)}")


def test_the_page_offers_tsv(app: InProcess) -> None:
    import re

    page = app.get("/").text
    assert re.search(r'data-format="tsv" href="[^"]*/datasets/orders\.tsv"', page)
    assert '"tsv"' in page  # the builder's format choice (page data)
