"""Signed links over real HTTP: bound to their maker token's row (not its name), one
budget with that token, shadowing no column; malformed links and durations get a 4xx
or a one-line command-line error, never a 500 or a traceback."""

from __future__ import annotations

import csv
import gzip
import io
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import BrowserContext, sync_playwright

from tests.support import ROOT, Server, fetch, forked, run_sql, wait_until
from tests.test_access import CLOSED, bearer, cli, make_link, new_token
from tests.test_browser import ARGS, CHROMIUM, download, sign_in


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def closed(database_url: str, logs_dir: Path, files_root: Path) -> Iterator[Server]:
    """A server that gives anonymous clients nothing; at most 2 downloads per principal,
    answered at once (no waiting room) if the limiter has one."""
    s = Server(database_url, logs_dir / "links.log",
               {"EXPORTER_FILES_ROOT": str(files_root), **CLOSED,
                "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "2", "EXPORTER_LIMIT_WAIT": "0"})
    with s:
        yield s


def test_reused_token_name_does_not_revive_old_links_with_the_cli(
    closed: Server, database_url: str, admin: str
) -> None:
    name = unique("partner")
    partner = new_token(database_url, name, "files:*")
    link = make_link(closed, partner, "/files/README.txt")
    assert httpx.get(link).status_code == 200
    r = httpx.delete(closed.url + f"/tokens/{name}", headers=bearer(admin))
    assert r.status_code == 200
    assert httpx.get(link).status_code == 403
    # What an operator does after a leak: a new token under the same name.
    replacement = new_token(database_url, name, "files:*")
    for _ in range(2):
        r = httpx.get(link)
        assert r.status_code == 403, r.text
        assert b"README" not in r.content
    assert httpx.head(link).status_code == 403
    # The new token works, and so do the links it makes.
    assert httpx.get(closed.url + "/files/README.txt",
                     headers=bearer(replacement)).status_code == 200
    assert httpx.get(make_link(closed, replacement, "/files/README.txt")).status_code == 200
    # Revoked from the command line and replaced again: the second link dies as well.
    second = make_link(closed, replacement, "/files/README.txt")
    cli(database_url, "token", "revoke", name)
    new_token(database_url, name, "files:*", "admin")
    # The server hears of both from the database (LISTEN/NOTIFY) within a second.
    assert wait_until(lambda: httpx.get(second).status_code == 403, 1)


class Held:
    """A download that took its slot and whose client never reads the body."""

    def __init__(self, server: Server, path: str, headers: dict[str, str]) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        head = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}",
                *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        self.status = self.sock.recv(12).decode()  # "HTTP/1.1 200": the slot is taken

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def held() -> Iterator[list[Held]]:
    downloads: list[Held] = []
    yield downloads
    for d in downloads:
        d.close()


def test_link_counts_against_its_makers_budget(
    closed: Server, database_url: str, held: list[Held]
) -> None:
    maker = new_token(database_url, unique("budget"), "files:*")
    other = new_token(database_url, unique("budget-other"), "files:*")
    links = [make_link(closed, maker, "/files/large.bin") for _ in range(3)]
    other_link = make_link(closed, other, "/files/large.bin")
    # Two slow downloads by header take the token's two slots...
    for _ in range(2):
        held.append(Held(closed, "/files/large.bin", bearer(maker)))
    assert [h.status for h in held] == ["HTTP/1.1 200"] * 2
    # ...so none of the links it made gets another: one token, one budget.
    for link in links:
        r = httpx.get(link, timeout=60)
        assert r.status_code == 429, r.status_code
        assert "retry-after" in r.headers
    # The cookie is the same token as well.
    r = httpx.get(closed.url + "/files/README.txt", cookies={"exporter_token": maker}, timeout=60)
    assert r.status_code == 429
    # Another token's link is not affected.
    assert httpx.get(other_link, headers={"Range": "bytes=0-9"}).status_code == 206
    # One slot by header and one by a link; a second link of the same token is refused.
    held.pop().close()
    assert wait_until(lambda: _slot_taken(closed, links[0], held), 10)
    assert httpx.get(links[1], timeout=60).status_code == 429
    assert httpx.get(closed.url + "/files/README.txt", headers=bearer(maker),
                     timeout=60).status_code == 429
    for h in held:
        h.close()
    held.clear()
    assert wait_until(lambda: httpx.get(links[2], headers={"Range": "bytes=0-9"}).status_code
                      == 206, 10)


def _slot_taken(server: Server, link: str, held: list[Held]) -> bool:
    """Hold a download through `link` once a slot is free (the freed one may take a moment)."""
    attempt = Held(server, link.removeprefix(server.url), {})
    if attempt.status == "HTTP/1.1 200":
        held.append(attempt)
        return True
    attempt.close()
    return False


SHADOWED = [  # id, by, expires, signature, limit, ~by, select
    (1, "alice", 10, "s1", 100, "t1", "x"),
    (2, "bob", 20, "s2", 200, "t2", "y"),
    (3, "carol", 30, "s3", 300, "t3", "z"),
    (4, "bob", 40, "s4", 400, "t4", "x"),
]


@pytest.fixture(scope="module")
def shadowed(database_url: str) -> Iterator[str]:
    """A dataset whose columns are named like the grammar's and the links' parameters;
    dropped after the module (the page's test lists the datasets of the same database)."""
    name = f"shadowed_{uuid.uuid4().hex[:6]}"
    values = ", ".join(f"({i}, '{b}', {e}, '{s}', {li}, '{t}', '{sel}')"
                       for i, b, e, s, li, t, sel in SHADOWED)
    run_sql(database_url,
            f'CREATE TABLE exports.{name} (id int, "by" text, expires int, signature text,'
            f' "limit" int, "~by" text, "select" text)',
            f"INSERT INTO exports.{name} VALUES {values}")
    yield name
    run_sql(database_url, f"DROP TABLE exports.{name}")


def ids(body: bytes) -> list[int]:
    return [int(row["id"]) for row in csv.DictReader(io.StringIO(body.decode()))]


@pytest.mark.parametrize(("query", "expected"), [
    ("by=eq.bob", [2, 4]),
    ("expires=gt.15&expires=lt.35", [2, 3]),
    ("signature=in.(s1,s3)", [1, 3]),
    ("by=eq.bob&signature=eq.s4", [4]),
    (f"{quote(chr(34) + 'limit' + chr(34))}=gte.300", [3, 4]),
    (f"{quote(chr(34) + '~by' + chr(34))}=eq.t2", [2]),
    (f"{quote(chr(34) + 'select' + chr(34))}=eq.x&limit=1", [1]),
    (f"{quote(chr(34) + 'by' + chr(34))}=eq.carol", [3]),  # any column may be quoted
])
def test_columns_named_like_parameters_are_filtered_directly_and_through_links(
    closed: Server, database_url: str, admin: str, shadowed: str, query: str,
    expected: list[int],
) -> None:
    path = f"/datasets/{shadowed}.csv?{query}&order=id"
    direct = httpx.get(closed.url + path, headers=bearer(admin))
    assert direct.status_code == 200, direct.text
    assert ids(direct.content) == expected
    link = make_link(closed, admin, path)
    via_link = httpx.get(link)
    assert via_link.status_code == 200, via_link.text
    assert via_link.content == direct.content
    operator = cli(database_url, "link", closed.url + path, "--expires", "5m").stdout.strip()
    assert httpx.get(operator).content == direct.content


def test_reserved_names_that_are_also_columns_say_how_to_reach_them(
    closed: Server, admin: str, shadowed: str
) -> None:
    base = closed.url + f"/datasets/{shadowed}.csv?"
    for query, parameter in [("limit=eq.100", "limit"), ("select=eq.x", "select"),
                             ("~by=eq.t1", "~by")]:
        r = httpx.get(base + query, headers=bearer(admin))
        assert r.status_code == 400, (query, r.text)
        error = r.json()["error"]
        assert error["parameter"] == parameter
        assert f'"{parameter}"=eq.' in error["message"], error
    for bad in ['"by', '""', '"a"b"']:
        r = httpx.get(base + quote(bad) + "=eq.1", headers=bearer(admin))
        assert r.status_code == 400 and "quoted column name" in r.json()["error"]["message"]
    # A link's parameters beside a token are refused, not ignored.
    r = httpx.get(base + "~expires=1", headers=bearer(admin))
    assert r.status_code == 400 and "signed links" in r.json()["error"]["message"]


@pytest.fixture
def chromium() -> Iterator[BrowserContext]:
    """For one test only: Playwright's sync API keeps an event loop running in this thread
    while it is open, and the helpers' asyncio.run() refuses to run beside it."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        try:
            context = browser.new_context(accept_downloads=True)
            context.set_default_timeout(20_000)
            yield context
        finally:
            browser.close()


@pytest.mark.needs("chromium")
def test_filter_builder_quotes_reserved_column_names_in_chromium(
    closed: Server, database_url: str, shadowed: str, chromium: BrowserContext,
) -> None:
    token = new_token(database_url, unique("builder"), f"datasets:{shadowed}")
    page = chromium.new_page()
    page.goto(closed.url + "/")
    sign_in(page, token)
    card = page.locator(f"article[data-dataset={shadowed}]")
    card.locator("summary:text-is('Choose rows')").click()
    for column, op, value in [("limit", "gte", "200"), ("by", "eq", "bob"), ("~by", "neq", "t9")]:
        card.locator("button.add").click()
        row = card.locator(".filter").last
        row.locator(".f-col").select_option(column)
        row.locator(".f-op").select_option(op)
        row.locator(".value").fill(value)
    card.locator(".order-col").select_option("id")
    query = "%22limit%22=gte.200&by=eq.bob&%22~by%22=neq.t9&order=id.asc"
    url = f"{closed.url}/datasets/{shadowed}.csv?{query}"
    assert card.locator("a[data-format=csv]").get_attribute("href") == url
    _, saved = download(page, f"article[data-dataset={shadowed}] a[data-format=csv]")
    assert ids(saved) == [2, 4]


BAD_LINKS = [
    "~expires=%C2%B2&~by=x&~signature=x",  # '²'.isdigit() is True, int('²') fails
    "~expires=%D9%A3&~by=x&~signature=" + "A" * 43,  # an Arabic-Indic digit
    "~expires=999999999999999999999&~by=x&~signature=" + "A" * 43,
    "~expires=1&~by=" + "x" * 5000 + "&~signature=" + "A" * 43,
    "~expires=1&~by=x",
    "%7Eexpires=1&%7eby=x&~signature=x&~signature=y",
    "~by=x",
]


@pytest.mark.parametrize("query", BAD_LINKS)
def test_malformed_link_parameters_get_403_never_500(closed: Server, query: str) -> None:
    for path in ["/datasets/orders.csv", "/datasets/orders", "/files/README.txt", "/files/",
                 "/datasets", "/", "/downloads", "/tokens"]:
        r = httpx.get(f"{closed.url}{path}?{query}")
        assert r.status_code == 403, (path, query, r.status_code, r.text[:200])


def test_former_link_parameter_names_are_plain_filters_never_500(server: Server) -> None:
    # Once a 500: the link parameters' old names with a '²' for the expiry.
    for path in ["/datasets/orders.csv", "/files/README.txt", "/files/", "/datasets", "/"]:
        r = httpx.get(f"{server.url}{path}?expires=%C2%B2&by=x&signature=x")
        assert r.status_code < 500, (path, r.status_code, r.text[:200])
    r = httpx.get(f"{server.url}/datasets/orders.csv?expires=%C2%B2&by=x&signature=x")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "unknown column 'expires' in dataset 'orders'"


@pytest.mark.parametrize("expires_in", ["999999999w", "99999999d", "5300w", "0s", "1.5h", "٣m",
                                        "15", 15, None, ["15m"], "9" * 100000 + "s"])
def test_bad_link_lifetimes_get_400(closed: Server, admin: str, expires_in: object) -> None:
    r = httpx.post(closed.url + "/links", headers=bearer(admin),
                   json={"url": "/files/README.txt", "expires_in": expires_in})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["parameter"] == "expires_in"


def test_bad_link_urls_get_400(closed: Server, admin: str) -> None:
    for url in ["http://[::1/files/README.txt", "//[x/files/README.txt",
                "/files/README.txt?~by=x", "/datasets/orders.csv?%7Eexpires=1"]:
        r = httpx.post(closed.url + "/links", headers=bearer(admin), json={"url": url})
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["parameter"] == "url"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # No database is needed to refuse these: no EXPORTER_DATABASE_URL, and none starts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["EXPORTER_DATA_DIR"] = "/nonexistent/exporter-must-not-start-a-database"
    return subprocess.run([*forked("exporter.cli"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    ["link", "http://127.0.0.1:1/files/README.txt", "--expires", "999999999w"],
    ["link", "/files/README.txt", "--expires", "²m"],
    ["link", "http://[::1/files/README.txt"],
    ["link", "/files/README.txt?~signature=x"],
    ["link", "/etc/passwd"],
    ["token", "create", "--name", "x", "--scope", "files:*", "--expires", "999999999w"],
    ["token", "create", "--name", "x", "--scope", "files:*", "--expires", "3"],
])
def test_cli_refuses_bad_durations_and_urls_in_one_line_with_status_2(args: list[str]) -> None:
    done = _run(*args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_cli_downloads_since_nonsense_is_one_line_with_status_2(database_url: str) -> None:
    done = cli(database_url, "downloads", "--since", "999999999w", check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("exporter downloads: --since")
    assert "Traceback" not in done.stderr
    since = cli(database_url, "downloads", "--since", "5200w", check=False)
    assert since.returncode == 0, since.stderr


def test_cli_token_with_a_taken_name_is_status_2(database_url: str) -> None:
    name = unique("taken")
    new_token(database_url, name, "files:*")
    done = cli(database_url, "token", "create", "--name", name, "--scope", "files:*",
               check=False)
    assert done.returncode == 2 and "exists" in done.stderr
    rows = fetch(database_url, "SELECT count(*) AS n FROM exporter.tokens WHERE name = $1", name)
    assert rows[0]["n"] == 1


def test_a_token_for_one_dataset_links_to_its_every_representation(
    closed: Server, database_url: str
) -> None:
    """One grammar for `name[.format][.coding]`: what a token may download, it may link
    to, compressed files included (POST /links refused `.csv.gz` with a 403)."""
    token = new_token(database_url, unique("orders-only"), "datasets:orders")
    direct = httpx.get(closed.url + "/datasets/orders.csv.gz?id=lt.20",
                       headers=bearer(token))
    assert direct.status_code == 200
    for path in ("/datasets/orders.csv.gz?id=lt.20", "/datasets/orders.ndjson.zst?id=lt.20",
                 "/datasets/orders.json?id=lt.20", "/datasets/orders?id=lt.20"):
        link = make_link(closed, token, path)
        r = httpx.get(link)
        assert r.status_code == 200, (path, r.text)
    link = make_link(closed, token, "/datasets/orders.csv.gz?id=lt.20")
    r = httpx.get(link, headers={"Accept-Encoding": "identity"})
    assert r.headers["content-type"] == "application/gzip"
    assert gzip.decompress(r.content) == gzip.decompress(direct.content)
    # Still only orders: another dataset, however it is spelled, is refused.
    for path in ("/datasets/customers.csv.gz", "/datasets/orders.csv.gz.csv",
                 "/datasets/ordersx.csv"):
        r = httpx.post(closed.url + "/links", json={"url": path}, headers=bearer(token))
        assert r.status_code == 403, (path, r.text)
