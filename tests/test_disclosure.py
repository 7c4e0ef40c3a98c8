"""What answers and logs tell (issue 21, "Names and secrets in answers and logs"): a signed
link answers alike whether its maker's name exists or not, a malformed one is refused
before any query, the logs (plain and JSON) escape what a request puts in them and redact
a link's signature under any spelling of its name, and no answer carries a server path."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from tests.support import (
    FreshDatabase,
    Server,
    audited,
    fetch,
    raw_request,
    run_sql,
    wait_until,
)
from tests.test_access import CLOSED, bearer, cli, make_link, new_token

SIGNATURE = "A" * 43
PLAIN_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[\d+\] [\w.]+: ")


def unique(name: str) -> str:
    return f"{name}-{os.urandom(3).hex()}"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("disclosure-files")
    (folder / "README.txt").write_bytes(b"hello\n")
    return folder


@pytest.fixture(scope="module")
def own_database(server_url_root: str) -> Iterator[str]:
    """A database of this module's own (a small `orders`), so that the tokens and the
    audit rows of its tests are all there is."""
    with FreshDatabase(server_url_root) as url:
        cli(url, "migrate")
        run_sql(url, "CREATE SCHEMA IF NOT EXISTS exports",
                "CREATE VIEW exports.orders AS SELECT g AS id FROM generate_series(1, 3) g")
        yield url


def serve(url: str, log_path: Path, env: dict[str, str]) -> Server:
    """A server with its access log on."""
    s = Server(url, log_path, env)
    s.command = [sys.executable, "-m", "exporter.cli", "serve", "--port", str(s.port)]
    return s


@pytest.fixture(scope="module", params=["plain", "json"])
def server(request: pytest.FixtureRequest, own_database: str, logs_dir: Path,
           root: Path) -> Iterator[Server]:
    """Files open to anonymous clients, datasets to tokens; plain or JSON logs."""
    log_format = request.param
    env = {**CLOSED, "EXPORTER_FILES_ROOT": str(root), "EXPORTER_PUBLIC_FILES": '["*"]',
           "EXPORTER_LOG_FORMAT": log_format, "EXPORTER_FORWARDED_ALLOW_IPS": "127.0.0.1"}
    with serve(own_database, logs_dir / f"disclosure-{log_format}.log", env) as s:
        yield s


def is_json(server: Server) -> bool:
    return server.env["EXPORTER_LOG_FORMAT"] == "json"


def logged_since(server: Server, offset: int) -> str:
    return server.log_path.read_bytes()[offset:].decode("utf-8", errors="replace")


def log_size(server: Server) -> int:
    return server.log_path.stat().st_size


def link_query(by: str, signature: str = SIGNATURE) -> str:
    return f"~expires={int(time.time()) + 3600}&~by={by}&~signature={signature}"


# --- which token names exist ------------------------------------------------------------


def test_a_wrong_signature_answers_alike_for_active_unknown_and_revoked_makers(
    server: Server, own_database: str
) -> None:
    database_url = own_database
    active, revoked = unique("named"), unique("gone")
    new_token(database_url, active, "files:*")
    gone = new_token(database_url, revoked, "files:*")
    genuine = make_link(server, gone, "/files/README.txt")
    assert httpx.get(genuine).status_code == 200
    cli(database_url, "token", "revoke", revoked)
    answers = [httpx.get(f"{server.url}/files/README.txt?{link_query(by)}")
               for by in (active, revoked, unique("never-made"))]
    answers.append(httpx.get(genuine))  # a true link of the revoked token
    assert {(r.status_code, r.content) for r in answers} == {(answers[0].status_code,
                                                              answers[0].content)}
    assert answers[0].status_code == 403
    assert answers[0].json()["error"]["message"].startswith("invalid signed link")


# --- malformed link parameters ----------------------------------------------------------

MALFORMED_BY = ["%00", "a%00b", "%1b[31mRED", "a%0Ab", "a%0D%0Ab", "%7F", "%C2%9B",
                "%FF", "%C3%28", "%ED%A0%80", "%C3%A9", "a%20b", "x" * 65, "x" * 5000, "-a",
                "%E2%80%AE"]


def token_scans(database_url: str) -> int:
    """How many scans have read exporter.tokens (the statistics PostgreSQL keeps)."""
    rows = fetch(database_url, "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS n"
                 " FROM pg_stat_user_tables WHERE schemaname = 'exporter'"
                 " AND relname = 'tokens'")
    return int(rows[0]["n"])


@pytest.fixture(scope="module")
def alone(server_url_root: str, logs_dir: Path, root: Path) -> Iterator[tuple[Server, str]]:
    """A server on a database of its own: nothing else reads its tokens."""
    with FreshDatabase(server_url_root) as url, Server(
        url, logs_dir / "disclosure-alone.log",
        {**CLOSED, "EXPORTER_FILES_ROOT": str(root), "EXPORTER_PUBLIC_FILES": '["*"]'},
    ) as s:
        yield s, url


def test_a_malformed_link_parameter_is_a_403_before_any_query(
    alone: tuple[Server, str]
) -> None:
    server, database_url = alone
    before = token_scans(database_url)
    queries = [link_query(by) for by in MALFORMED_BY]
    queries += [f"~expires=1%00&~by=x&~signature={SIGNATURE}",
                f"~expires=%1b&~by=x&~signature={SIGNATURE}",
                "~expires=1&~by=x&~signature=" + "A" * 42 + "%00",
                "~expires=1&~by=x&~signature=" + "A" * 42 + "%FF",
                "~expires=1&~by=x&~signature=" + "A" * 5000]
    for path in ["/files/README.txt", "/datasets/orders.csv", "/files/"]:
        for query in queries:
            r = httpx.get(f"{server.url}{path}?{query}")
            assert r.status_code == 403, (path, query, r.status_code, r.text[:300])
            assert r.json()["error"]["message"].startswith("invalid signed link"), r.text
    # Well formed, of unknown makers: these do read the tokens (and show that the
    # statistics move, once PostgreSQL has flushed them: an idle backend does within
    # about 10 s).
    for _ in range(3):
        r = httpx.get(f"{server.url}/files/README.txt?{link_query(unique('unknown'))}")
        assert r.status_code == 403
    assert wait_until(lambda: token_scans(database_url) >= before + 3, 30)
    assert token_scans(database_url) == before + 3


# --- control characters in the logs -----------------------------------------------------


def test_the_log_escapes_control_characters_from_requests(
    server: Server, own_database: str
) -> None:
    admin = new_token(own_database, unique("escapes"), "admin")
    offset = log_size(server)
    # The request: once a 502, logged with the path's ESC sequences as they came.
    r = httpx.get(f"{server.url}/files/x%1b[31mRED%1b[0m?{link_query('%00')}")
    assert r.status_code == 403, r.text
    # A name no token can have: once a 502 (the NUL), logged the same way.
    r = httpx.delete(f"{server.url}/tokens/x%1b[31mRED%1b[0m%00", headers=bearer(admin))
    assert r.status_code == 404, r.text
    # What a trusted proxy forwards is printed as the client's address: bytes beyond ASCII
    # arrive as Latin-1, so C1 controls (CSI, and NEL, a line break to Unicode) as well.
    r = raw_request(server.url, "GET /files/README.txt?a=%1b[2J%0a HTTP/1.1",
                    {"X-Forwarded-For": "10.0.0.1\x9b31mRED\x85FORGED line"})
    assert r.status == 200
    assert wait_until(lambda: "README.txt?a=" in logged_since(server, offset), 20)
    raw = server.log_path.read_bytes()[offset:]
    for byte in range(0x20):
        if byte != 0x0A:
            assert bytes([byte]) not in raw, hex(byte)
    assert b"\x7f" not in raw and "\x9b".encode() not in raw
    lines = raw.decode().splitlines()
    if is_json(server):
        messages = [json.loads(line)["message"] for line in lines]
        assert any("10.0.0.1\x9b31mRED\x85FORGED line" in m for m in messages), messages
    else:
        assert all(PLAIN_LINE.match(line) for line in lines), lines
        assert any("10.0.0.1\\x9b31mRED\\x85FORGED line" in line for line in lines), lines


# --- a link's signature, whatever its spelling -------------------------------------------

SPELLINGS = ["~sig%6Eature", "%7Esignature", "%7esignature", "~signatur%65",
             "%7E%73%69%67%6E%61%74%75%72%65"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_of_the_signature_is_redacted_in_logs_and_audit(
    server: Server, own_database: str, spelling: str
) -> None:
    database_url = own_database
    name = unique("spelled")
    token = new_token(database_url, name, "datasets:orders", "files:*")
    offset = log_size(server)
    links = [make_link(server, token, "/datasets/orders.csv?limit=1"),
             make_link(server, token, "/files/README.txt")]
    signatures = []
    for link in links:
        signatures.append(dict(parse_qsl(urlsplit(link).query))["~signature"])
        spelled = link.replace("~signature=", spelling + "=")
        r = httpx.get(spelled)
        assert r.status_code == 200, (spelled, r.text)  # it authenticates
    rows = audited(database_url, "principal = $1", f"link by {name}", count=2)
    assert {row["target"] for row in rows} == {"orders", "README.txt"}
    assert wait_until(lambda: logged_since(server, offset).count(f"{spelling}=") >= 2, 20)
    log = logged_since(server, offset)
    assert log.count(f"{spelling}=REDACTED") == 2, log
    for signature in signatures:
        assert signature not in log
        assert all(signature not in json.dumps(row, default=str) for row in rows)


# --- no server path in answers ----------------------------------------------------------


def test_an_exports_folder_that_cannot_be_written_shows_no_path(
    database_url: str, logs_dir: Path, tmp_path: Path
) -> None:
    blocked = tmp_path / "exports-is-a-file"
    blocked.write_bytes(b"")  # the folder's name is taken by a file: mkdir says EEXIST
    token = new_token(database_url, unique("storage"), "datasets:orders")
    env = {**CLOSED, "EXPORTER_EXPORTS_DIR": str(blocked)}
    with Server(database_url, logs_dir / "disclosure-storage.log", env) as s:
        r = httpx.post(s.url + "/exports", headers=bearer(token),
                       json={"url": "/datasets/orders.csv?limit=1"}, timeout=30)
        assert r.status_code == 503, r.text
        listed = httpx.get(s.url + "/exports", headers=bearer(token), timeout=30)
        assert listed.status_code == 200
        exports = listed.json()["exports"]
        assert [e["status"] for e in exports] == ["failed"]
        assert exports[0]["error"] == "the storage refused the file: File exists"
        for answer in (r, listed):
            assert str(tmp_path) not in answer.text and "Errno" not in answer.text
        assert wait_until(lambda: str(blocked) in s.log(), 10)  # the log has the detail


def test_without_paths_keeps_the_reason_and_drops_the_file_names(tmp_path: Path) -> None:
    from exporter.errors import without_paths

    try:
        os.replace(tmp_path / "a.part", tmp_path / "a")
    except OSError as error:
        assert without_paths(error) == "No such file or directory"
    assert without_paths(OSError(f"cannot open {tmp_path}")) == "OSError"
    assert without_paths(ValueError(f"bad {tmp_path}")) == "internal error: ValueError"
