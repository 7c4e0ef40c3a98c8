"""Access control over real HTTP, with curl and wget: tokens and scopes, signed links,
public settings, limits, and no secret in logs or the audit trail."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from tests.support import Server, exporter_cli, fetch, wait_until

CLOSED = {"EXPORTER_PUBLIC_DATASETS": "[]", "EXPORTER_PUBLIC_FILES": "[]"}
SCOPES = {
    "all-data": ["datasets:*"],
    "orders-only": ["datasets:orders"],
    "all-files": ["files:*"],
    "nested-only": ["files:nested/"],
    "boss": ["admin"],
}


def cli(database_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`exporter ARGS` on that database, in this process (tests/test_cli.py spawns the
    installed command)."""
    return exporter_cli(*args, env={"EXPORTER_DATABASE_URL": database_url}, check=check)


def new_token(database_url: str, name: str, *scopes: str, expires: str | None = None) -> str:
    args = ["token", "create", "--name", name]
    for scope in scopes:
        args += ["--scope", scope]
    if expires:
        args += ["--expires", expires]
    secret = cli(database_url, *args).stdout.strip()
    assert re.fullmatch(r"exp_[A-Za-z0-9_-]{43}", secret), secret
    return secret


@pytest.fixture(scope="module")
def tokens(database_url: str) -> dict[str, str]:
    suffix = hashlib.sha256(os.urandom(8)).hexdigest()[:6]
    return {name: new_token(database_url, f"{name}-{suffix}", *scopes)
            for name, scopes in SCOPES.items()}


@pytest.fixture(scope="module")
def closed(database_url: str, logs_dir: Path, files_root: Path) -> Iterator[Server]:
    """A server that gives anonymous clients nothing, with its access log on."""
    s = Server(database_url, logs_dir / "closed.log",
               {"EXPORTER_FILES_ROOT": str(files_root), **CLOSED})
    s.command = [sys.executable, "-m", "exporter.cli", "serve", "--port", str(s.port)]
    with s:
        yield s


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def get(server: Server, path: str, token: str | None = None, **kw: object) -> httpx.Response:
    headers = bearer(token) if token else {}
    return httpx.get(server.url + path, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]


def token_name(tokens: dict[str, str], key: str, database_url: str) -> str:
    rows = fetch(database_url, "SELECT name FROM exporter.tokens WHERE secret_hash = $1",
                 hashlib.sha256(tokens[key].encode()).digest())
    return str(rows[0]["name"])


def test_no_credentials_get_401_with_both_challenges(closed: Server) -> None:
    for path in ["/datasets", "/datasets/orders.csv", "/datasets/no-such-thing.csv",
                 "/files/", "/files/README.txt", "/files/no/such/file", "/downloads",
                 "/tokens"]:
        r = get(closed, path)
        assert r.status_code == 401, path
        assert r.headers.get_list("www-authenticate") == [
            'Bearer realm="exporter"', 'Basic realm="exporter", charset="UTF-8"'
        ]
        assert r.json()["error"]["status"] == 401
    assert get(closed, "/healthz").status_code == 200


@pytest.mark.parametrize("authorization", [
    "Bearer exp_wrongwrongwrongwrongwrongwrongwrongwrongwro",
    "Bearer", "Basic !!!notbase64", "Basic " + "eDp4",  # x:x
    "Digest username=x", "Bearer " + "x" * 5000,
])
def test_bad_credentials_get_401(closed: Server, authorization: str) -> None:
    r = httpx.get(closed.url + "/datasets/orders.csv", headers={"Authorization": authorization})
    assert r.status_code == 401
    assert len(r.headers.get_list("www-authenticate")) == 2


EXPECTED = {
    # token: (paths answered 200, paths answered 403)
    "all-data": (["/datasets/orders.csv?limit=2", "/datasets/daily_revenue.ndjson?limit=2"],
                 ["/files/README.txt", "/files/", "/downloads"]),
    "orders-only": (["/datasets/orders.csv?limit=2", "/datasets/orders?limit=1"],
                    ["/datasets/daily_revenue.csv", "/datasets/no-such-thing.csv",
                     "/files/nested/data.json", "/downloads", "/tokens"]),
    "all-files": (["/files/README.txt", "/files/nested/data.json", "/files/"],
                  ["/datasets/orders.csv", "/downloads"]),
    "nested-only": (["/files/nested/data.json", "/files/nested/", "/files/"],
                    ["/files/README.txt", "/files/nested/up-link.txt", "/files/nope.txt",
                     "/files/inside-link.txt", "/datasets/orders.csv"]),
    "boss": (["/datasets/orders.csv?limit=1", "/files/README.txt", "/downloads", "/tokens"],
             []),
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_each_scope_against_each_kind_of_target(
    closed: Server, tokens: dict[str, str], key: str
) -> None:
    allowed, refused = EXPECTED[key]
    for path in allowed:
        r = get(closed, path, tokens[key])
        assert r.status_code == 200, (key, path, r.text)
    for path in refused:
        r = get(closed, path, tokens[key])
        assert r.status_code == 403, (key, path, r.status_code)
        assert "www-authenticate" not in r.headers
    # Only a caller whose scopes cover a name learns whether it exists.
    expected_for_missing = 404 if key in ("all-data", "boss") else 403
    assert get(closed, "/datasets/no-such-thing.csv", tokens[key]).status_code == \
        expected_for_missing


def test_catalog_and_listings_show_only_what_may_be_downloaded(
    closed: Server, tokens: dict[str, str]
) -> None:
    def datasets(key: str) -> set[str]:
        r = get(closed, "/datasets", tokens[key])
        assert r.status_code == 200
        return {d["name"] for d in r.json()["datasets"]}

    def entries(key: str, path: str = "/files/") -> set[str]:
        r = get(closed, path, tokens[key])
        assert r.status_code == 200
        return {e["name"] for e in r.json()["entries"]}

    assert datasets("orders-only") == {"orders"}
    assert {"orders", "daily_revenue"} <= datasets("all-data")
    assert datasets("nested-only") == set()
    assert entries("nested-only") == {"nested"}
    # up-link.txt lies in nested/ but leads to the root's README.txt: not listed.
    assert "data.json" in entries("nested-only", "/files/nested/")
    assert "up-link.txt" not in entries("nested-only", "/files/nested/")
    assert {"README.txt", "nested", "large.bin"} <= entries("all-files")


@pytest.mark.needs("curl", "wget")
def test_basic_and_bearer_with_curl_and_wget(
    closed: Server, tokens: dict[str, str], tmp_path: Path
) -> None:
    url = closed.url + "/datasets/orders.csv?id=lte.100&order=id"
    expected = get(closed, "/datasets/orders.csv?id=lte.100&order=id", tokens["all-data"]).content
    token = tokens["all-data"]
    for argv in (
        ["curl", "-fsS", "-u", f"anyone:{token}", "-o", "basic.csv", url],
        ["curl", "-fsS", "-H", f"Authorization: Bearer {token}", "-o", "bearer.csv", url],
        ["wget", "-q", "--user=x", f"--password={token}", "-O", "wget.csv", url],
    ):
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=60)
        assert done.returncode == 0, (argv[0], done.stderr)
    for name in ("basic.csv", "bearer.csv", "wget.csv"):
        assert (tmp_path / name).read_bytes() == expected
    refused = subprocess.run(["curl", "-fsS", "-u", "x:wrong", "-o", "no.csv", url],
                             cwd=tmp_path, capture_output=True, timeout=60)
    assert refused.returncode == 22 and not (tmp_path / "no.csv").exists()
    wget_refused = subprocess.run(["wget", "-q", "--user=x", "--password=wrong", url],
                                  cwd=tmp_path, capture_output=True, timeout=60)
    assert wget_refused.returncode == 6  # wget: authentication failure


def test_revoke_takes_effect_within_a_second_in_every_server_process(
    closed: Server, make_server: type[Server], database_url: str
) -> None:
    secret = new_token(database_url, f"short-lived-{os.getpid()}", "datasets:*")
    name = f"short-lived-{os.getpid()}"
    with make_server(CLOSED) as second:
        for s in (closed, second):
            assert get(s, "/datasets/orders.csv?limit=1", secret).status_code == 200
        admin = new_token(database_url, f"revoker-{os.getpid()}", "admin")
        r = httpx.delete(closed.url + f"/tokens/{name}", headers=bearer(admin))
        assert r.status_code == 200 and r.json()["state"] == "revoked"
        # At once in the process that revoked it; in the other when the database's
        # notification arrives (tokens are cached: access/token_cache.py).
        assert get(closed, "/datasets/orders.csv?limit=1", secret).status_code == 401
        assert wait_until(lambda: get(second, "/datasets/orders.csv?limit=1",
                                      secret).status_code == 401, 1)
    listing = cli(database_url, "token", "list").stdout
    assert re.search(rf"^{name}\s.*revoked\s*$", listing, re.M), listing
    assert secret not in listing and "exp_" not in listing


def test_revoke_from_the_command_line(closed: Server, database_url: str) -> None:
    name = f"cli-revoked-{os.getpid()}"
    secret = new_token(database_url, name, "datasets:orders")
    assert get(closed, "/datasets/orders.csv?limit=1", secret).status_code == 200
    cli(database_url, "token", "revoke", name)
    # The server hears of it from the database (LISTEN/NOTIFY) within a second.
    assert wait_until(
        lambda: get(closed, "/datasets/orders.csv?limit=1", secret).status_code == 401, 1)
    # the name is free again
    again = new_token(database_url, name, "datasets:orders")
    assert get(closed, "/datasets/orders.csv?limit=1", again).status_code == 200


def test_expiry_takes_effect(closed: Server, database_url: str) -> None:
    secret = new_token(database_url, f"expiring-{os.getpid()}", "datasets:*", expires="2s")
    assert get(closed, "/datasets/orders.csv?limit=1", secret).status_code == 200
    assert wait_until(
        lambda: get(closed, "/datasets/orders.csv?limit=1", secret).status_code == 401, 5
    )


def make_link(server: Server, token: str, url: str, expires_in: str = "15m") -> str:
    r = httpx.post(server.url + "/links", headers=bearer(token),
                   json={"url": url, "expires_in": expires_in})
    assert r.status_code == 201, r.text
    link: str = r.json()["url"]
    assert link.startswith(server.url)
    return link


def tampered(link: str, change: str) -> str:
    parts = urlsplit(link)
    params = parse_qsl(parts.query, keep_blank_values=True)
    path = parts.path
    if change == "path":
        path = path.replace("orders", "daily_revenue")
    elif change == "traversal":
        path = path.replace("/datasets/orders.csv", "/files/nested/../README.txt")
    else:
        params = [(k, v) for k, v in params]
        if change == "filter":
            params = [(k, "lte.20" if k == "id" else v) for k, v in params]
        elif change == "extra":
            params.append(("select", "id"))
        elif change == "dropped":
            params = [(k, v) for k, v in params if k != "id"]
        elif change == "expires":
            params = [(k, str(int(v) + 3600) if k == "~expires" else v) for k, v in params]
        elif change == "by":
            params = [(k, "boss" if k == "~by" else v) for k, v in params]
        elif change == "signature":
            params = [(k, v[:-2] + ("AA" if v[-2:] != "AA" else "BB") if k == "~signature"
                       else v) for k, v in params]
        elif change == "format":
            path = path.replace(".csv", ".ndjson")
    return urlunsplit(parts._replace(path=path, query=urlencode(params)))


@pytest.mark.needs("wget")
def test_signed_link_works_without_credentials_and_breaks_when_changed(
    closed: Server, tokens: dict[str, str], tmp_path: Path
) -> None:
    link = make_link(closed, tokens["orders-only"], "/datasets/orders.csv?id=lte.10&order=id")
    assert "~signature=" in link and "~expires=" in link
    expected = get(closed, "/datasets/orders.csv?id=lte.10&order=id", tokens["orders-only"])
    assert httpx.get(link).content == expected.content
    done = subprocess.run(["wget", "-q", "-O", "link.csv", link], cwd=tmp_path,
                          capture_output=True, timeout=60)
    assert done.returncode == 0 and (tmp_path / "link.csv").read_bytes() == expected.content
    assert httpx.head(link).status_code == 200
    for change in ["path", "filter", "extra", "dropped", "expires", "by", "signature",
                   "format", "traversal"]:
        r = httpx.get(tampered(link, change))
        assert r.status_code == 403, change
        assert b"id,customer" not in r.content


def test_links_are_limited_to_their_makers_scopes(
    closed: Server, tokens: dict[str, str], database_url: str
) -> None:
    r = httpx.post(closed.url + "/links", headers=bearer(tokens["orders-only"]),
                   json={"url": "/datasets/daily_revenue.csv"})
    assert r.status_code == 403
    r = httpx.post(closed.url + "/links", headers=bearer(tokens["nested-only"]),
                   json={"url": "/files/nested/../README.txt"})
    assert r.status_code == 400
    r = httpx.post(closed.url + "/links", json={"url": "/datasets/orders.csv"})
    assert r.status_code == 401
    # a link dies with its maker's token
    name = f"link-maker-{os.getpid()}"
    maker = new_token(database_url, name, "datasets:orders")
    link = make_link(closed, maker, "/datasets/orders.csv?limit=1")
    assert httpx.get(link).status_code == 200
    cli(database_url, "token", "revoke", name)
    # Revoked elsewhere (the command line): the server hears of it within a second.
    assert wait_until(lambda: httpx.get(link).status_code == 403, 1)


def test_expired_link_is_refused(closed: Server, tokens: dict[str, str]) -> None:
    link = make_link(closed, tokens["orders-only"], "/datasets/orders.csv?limit=1", "1s")
    assert wait_until(lambda: httpx.get(link).status_code == 403, 4)
    assert "expired" in httpx.get(link).json()["error"]["message"]


@pytest.mark.needs("wget")
def test_signed_file_link_resumes_with_wget(
    closed: Server, tokens: dict[str, str], files_root: Path, tmp_path: Path
) -> None:
    link = make_link(closed, tokens["all-files"], "/files/large.bin")
    original = (files_root / "large.bin").read_bytes()
    (tmp_path / "large.bin").write_bytes(original[: len(original) // 3])
    done = subprocess.run(["wget", "-q", "-c", "-O", "large.bin", link], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256((tmp_path / "large.bin").read_bytes()).digest() == \
        hashlib.sha256(original).digest()


def test_operator_links_and_key_rotation(closed: Server, database_url: str) -> None:
    made = cli(database_url, "link", closed.url + "/datasets/orders.ndjson?limit=2",
               "--expires", "5m")
    link = made.stdout.strip()
    assert link.startswith(closed.url + "/datasets/orders.ndjson?")
    r = httpx.get(link)
    assert r.status_code == 200 and len(r.text.splitlines()) == 2
    cli(database_url, "link", "rotate-key")
    assert httpx.get(link).status_code == 403


def test_principal_in_audit_and_admin_endpoints(
    closed: Server, tokens: dict[str, str], database_url: str
) -> None:
    orders_only = token_name(tokens, "orders-only", database_url)
    for _ in range(4):  # enough rows for the limit below, also when this test runs alone
        assert get(closed, "/datasets/orders.csv?limit=3", tokens["orders-only"]).status_code == 200
    link = make_link(closed, tokens["orders-only"], "/datasets/orders.csv?limit=4")
    assert httpx.get(link).status_code == 200

    def last(principal: str) -> dict[str, object]:
        rows = fetch(database_url, "SELECT * FROM exporter.downloads WHERE principal = $1"
                     " AND status = 'complete' ORDER BY id DESC LIMIT 1", principal)
        return dict(rows[0]) if rows else {}

    # Generous deadlines: the rows are written in batches, later on a busy machine.
    assert wait_until(lambda: last(f"token {orders_only}").get("rows") == 3, 20)
    assert wait_until(lambda: last(f"link by {orders_only}").get("rows") == 4, 20)
    assert last(f"link by {orders_only}")["link_expires"] is not None
    assert "signature" not in str(last(f"link by {orders_only}")["params"])

    r = get(closed, "/downloads?limit=5", tokens["boss"])
    assert r.status_code == 200
    rows = r.json()
    assert len(rows) == 5 and rows[0]["id"] > rows[1]["id"]
    assert {"principal", "target", "status", "bytes", "link_expires"} <= set(rows[0])
    r = get(closed, "/downloads?principal=eq.token%20" + orders_only, tokens["boss"])
    assert {row["principal"] for row in r.json()} == {f"token {orders_only}"}
    csv = get(closed, "/downloads.csv?order=id&select=id,principal,status", tokens["boss"])
    assert csv.status_code == 200 and csv.text.startswith("id,principal,status\n")
    assert get(closed, "/downloads.ndjson?limit=1", tokens["all-data"]).status_code == 403
    table = cli(database_url, "downloads", "--principal", f"token {orders_only}").stdout
    assert f"token {orders_only}" in table and "complete" in table


def test_no_secret_in_logs_or_audit(
    closed: Server, tokens: dict[str, str], database_url: str
) -> None:
    link = make_link(closed, tokens["orders-only"], "/datasets/orders.csv?limit=1")
    assert httpx.get(link).status_code == 200
    assert httpx.get(tampered(link, "extra")).status_code == 403
    signature = dict(parse_qsl(urlsplit(link).query))["~signature"]
    audit = fetch(database_url, "SELECT string_agg(d::text, '\n') AS t FROM exporter.downloads d")
    log = closed.log()
    assert "GET /datasets/orders.csv?limit=1" in log  # the access log is on
    for secret in [*tokens.values(), signature]:
        assert secret not in log
        assert secret not in str(audit[0]["t"])
    assert "signature=REDACTED" in log


def test_public_settings_open_what_they_name(
    make_server: type[Server], tokens: dict[str, str]
) -> None:
    env = {"EXPORTER_PUBLIC_DATASETS": '["daily_revenue"]',
           "EXPORTER_PUBLIC_FILES": '["nested/"]'}
    with make_server(env) as s:
        assert get(s, "/datasets/daily_revenue.csv").status_code == 200
        assert get(s, "/datasets/orders.csv").status_code == 401
        assert [d["name"] for d in get(s, "/datasets").json()["datasets"]] == ["daily_revenue"]
        assert get(s, "/files/nested/data.json").status_code == 200
        assert get(s, "/files/README.txt").status_code == 401
        assert {e["name"] for e in get(s, "/files/").json()["entries"]} == {"nested"}
        # a token still reaches what it names
        assert get(s, "/datasets/orders.csv?limit=1", tokens["orders-only"]).status_code == 200


@pytest.mark.needs("curl")
def test_fifth_concurrent_download_gets_429(
    closed: Server, tokens: dict[str, str], tmp_path: Path, database_url: str
) -> None:
    url = closed.url + "/files/large.bin"
    slow = [subprocess.Popen(["curl", "-sS", "--limit-rate", "1M", "-H",
                              f"Authorization: Bearer {tokens['all-files']}", "-o", f"{i}.bin",
                              url], cwd=tmp_path, stderr=subprocess.PIPE) for i in range(4)]
    try:
        assert wait_until(lambda: all((tmp_path / f"{i}.bin").exists() for i in range(4)), 10)
        r = get(closed, "/files/large.bin", tokens["all-files"])
        assert r.status_code == 429
        assert r.headers["retry-after"] == "5"
        # the cap counts per principal: another one is not affected
        r = get(closed, "/datasets/orders.csv", tokens["boss"])
        assert r.status_code == 200
    finally:
        for p in slow:
            p.kill()
            p.wait()
    assert wait_until(
        lambda: get(closed, "/files/README.txt", tokens["all-files"]).status_code == 200, 5
    )


def test_bandwidth_cap(make_server: type[Server]) -> None:
    with make_server({"EXPORTER_MAX_BYTES_PER_SECOND": str(4 * 2**20)}) as s:
        started = time.monotonic()
        r = httpx.get(s.url + "/files/large.bin", headers={"Range": "bytes=0-8388607"})
        elapsed = time.monotonic() - started
        assert r.status_code == 206 and len(r.content) == 8 * 2**20
        assert elapsed > 1.5, f"8 MiB at 4 MiB/s took {elapsed:.2f} s"
