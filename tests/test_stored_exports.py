"""Stored exports over a real server: start (POST /exports, `Prefer: respond-async`),
watch (202 with progress), fetch (the file with Range, ETag, digests) with curl, wget,
aria2c and polars; cancel, quota, restart, signed links, others' ids."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporter.exports.filenames import query_tag
from tests.support import Server, audited, fetch, run_sql, wait_until
from tests.test_access import bearer, make_link, new_token

CLOSED = {"EXPORTER_PUBLIC_DATASETS": "[]", "EXPORTER_PUBLIC_FILES": "[]"}
FAST = {"EXPORTER_EXPORTS_PROGRESS_INTERVAL": "0.2", "EXPORTER_EXPORTS_CLEANUP_INTERVAL": "1"}
ORDERS = "/datasets/orders.csv?order=id&amount=gt.5"
COPIES = ("SELECT pid FROM pg_stat_activity WHERE query ILIKE 'COPY%' AND state = 'active'"
          " AND pid <> pg_backend_pid()")


@pytest.fixture(scope="module")
def views(database_url: str) -> None:
    run_sql(
        database_url,
        "CREATE OR REPLACE VIEW exports.endless AS"
        " SELECT generate_series(1, 1000000000) AS id, repeat('x', 200) AS pad",
        # Rows that come slowly: progress can be watched growing.
        "CREATE OR REPLACE VIEW exports.trickle AS"
        " SELECT g AS id, pg_sleep(0.0025) IS NULL AS slept FROM generate_series(1, 2000) AS g",
    )


@pytest.fixture(scope="module")
def server(make_module_server: type[Server], tmp_path_factory: pytest.TempPathFactory,
           views: None) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("stored")
    with make_module_server({**CLOSED, **FAST, "EXPORTER_EXPORTS_DIR": str(folder)}) as s:
        yield s


@pytest.fixture(scope="module")
def alice(database_url: str) -> str:
    return new_token(database_url, f"alice-{os.urandom(3).hex()}", "datasets:*")


@pytest.fixture(scope="module")
def bob(database_url: str) -> str:
    return new_token(database_url, f"bob-{os.urandom(3).hex()}", "datasets:*")


@pytest.fixture(scope="module")
def boss(database_url: str) -> str:
    return new_token(database_url, f"boss-{os.urandom(3).hex()}", "admin")


def start(server: Server, token: str, url: str, **extra: Any) -> httpx.Response:
    return httpx.post(server.url + "/exports", headers=bearer(token),
                      json={"url": url, **extra}, timeout=30)


def wait_done(server: Server, token: str, location: str, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(server.url + location, headers=bearer(token) if token else {},
                      timeout=30)
        if r.status_code != 202 or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def finished(server: Server, token: str, url: str, **extra: Any) -> dict[str, Any]:
    r = start(server, token, url, **extra)
    assert r.status_code == 202, r.text
    done = wait_done(server, token, r.headers["location"])
    assert done.status_code == 200, done.text
    manifest: dict[str, Any] = done.json()
    return manifest


def test_post_runs_to_a_file_equal_to_the_streamed_export(server: Server, alice: str) -> None:
    r = start(server, alice, ORDERS)
    assert r.status_code == 202, r.text
    assert r.headers["preference-applied"] == "respond-async"
    assert r.headers["location"] == f"/exports/{r.json()['id']}"
    assert int(r.headers["retry-after"]) >= 1
    done = wait_done(server, alice, r.headers["location"])
    assert done.status_code == 200, done.text
    m = done.json()
    assert m["status"] == "complete" and m["dataset"] == "orders" and m["format"] == "csv"
    assert m["url"] == "/datasets/orders.csv?order=id&amount=gt.5"
    assert m["snapshot_time"] and m["expires"] and m["finished"]
    body = httpx.get(m["file_url"], headers=bearer(alice), timeout=30)
    assert body.status_code == 200
    streamed = httpx.get(server.url + ORDERS, headers=bearer(alice), timeout=30).content
    assert body.content == streamed  # the demo data does not change meanwhile
    assert m["bytes"] == len(body.content) == int(body.headers["content-length"])
    # The COPY's own count (values hold newlines: counting lines would be wrong).
    assert m["rows"] == len(list(csv.reader(io.StringIO(body.text, newline="")))) - 1
    digest = hashlib.sha256(body.content).digest()
    assert m["sha256"] == digest.hex()
    assert m["sha256_base64"] == base64.b64encode(digest).decode()
    assert body.headers["repr-digest"] == f"sha-256=:{m['sha256_base64']}:"
    assert body.headers["digest"] == f"SHA-256={m['sha256_base64']}"
    assert body.headers["etag"].startswith('"') and body.headers["last-modified"]
    assert m["filename"] in body.headers["content-disposition"]


def test_stored_exports_are_named_as_streamed_ones(server: Server, alice: str) -> None:
    """The dataset, the snapshot time, and for a query 8 hex digits of its hash: two
    stored exports of different URLs started in the same second are two files."""
    whole = finished(server, alice, "/datasets/daily_revenue.csv")
    assert re.fullmatch(r"daily_revenue-\d{8}T\d{6}Z\.csv", whole["filename"])
    tag = query_tag("limit=5&order=id")
    some = finished(server, alice, "/datasets/orders.csv.gz?limit=5&order=id")
    assert re.fullmatch(rf"orders-\d{{8}}T\d{{6}}Z-{tag}\.csv\.gz", some["filename"])
    got = httpx.get(some["file_url"], headers=bearer(alice), timeout=30)
    assert f'filename="{some["filename"]}"' in got.headers["content-disposition"]
    # Prefer: respond-async names the URL's export alike.
    r = httpx.get(server.url + "/datasets/orders.csv?limit=5&order=id",
                  headers={**bearer(alice), "Prefer": "respond-async"}, timeout=30)
    assert r.status_code == 202, r.text
    m = wait_done(server, alice, r.headers["location"]).json()
    assert re.fullmatch(rf"orders-\d{{8}}T\d{{6}}Z-{tag}\.csv", m["filename"])


def test_prefer_respond_async_and_gzip(server: Server, alice: str) -> None:
    r = httpx.get(server.url + "/datasets/orders.csv?limit=500&order=id",
                  headers={**bearer(alice), "Prefer": "wait=5, respond-async"}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["preference-applied"] == "respond-async"
    m = wait_done(server, alice, r.headers["location"]).json()
    plain = httpx.get(m["file_url"], headers=bearer(alice)).content
    assert len(list(csv.reader(io.StringIO(plain.decode(), newline="")))) == 501
    assert m["rows"] == 500

    z = finished(server, alice, "/datasets/orders.csv.gz?limit=500&order=id")
    assert z["coding"] == "gzip" and z["filename"].endswith(".csv.gz")
    got = httpx.get(z["file_url"], headers=bearer(alice))
    assert got.headers["content-type"] == "application/gzip"
    assert "content-encoding" not in got.headers  # a gzip file, not a coding of CSV
    assert gzip.decompress(got.content) == plain
    zst = finished(server, alice, "/datasets/orders.csv?limit=500&order=id", coding="zstd")
    import zstandard

    data = httpx.get(zst["file_url"], headers=bearer(alice)).content
    assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == plain


def test_progress_is_seen_growing(server: Server, alice: str) -> None:
    r = start(server, alice, "/datasets/trickle.ndjson")
    location = r.headers["location"]
    seen: list[int] = []
    while True:
        s = httpx.get(server.url + location, headers=bearer(alice))
        if s.status_code != 202:
            break
        p = s.json()["progress"]
        assert s.headers["retry-after"] and s.headers["x-progress"]
        assert p["estimated_rows"] == 2000  # EXPLAIN of the view
        assert set(p) >= {"rows", "bytes", "percent", "started", "elapsed"}
        seen.append(p["rows"])
        time.sleep(0.2)
    assert s.status_code == 200 and s.json()["rows"] == 2000
    growing = [n for n in seen if 0 < n < 2000]
    assert len(set(growing)) >= 2, seen  # watched while it ran, rows going up
    assert seen == sorted(seen)


def test_progress_of_a_binary_format_is_its_bytes(server: Server, alice: str) -> None:
    """A ZIP (XLSX) has no line per row: while it runs, its progress says bytes, never a
    count of line breaks taken for rows (whatever the deflated bytes held)."""
    r = start(server, alice, "/datasets/trickle.xlsx")
    location = r.headers["location"]
    seen = 0
    while (s := httpx.get(server.url + location, headers=bearer(alice))).status_code == 202:
        p = s.json()["progress"]
        assert p["rows"] is None and p["percent"] is None, p
        assert s.headers["x-progress"] == f"{p['bytes']} bytes"
        seen += 1
        time.sleep(0.2)
    assert s.status_code == 200 and s.json()["rows"] == 2000
    assert seen >= 2


def test_errors_are_those_of_the_streamed_export(server: Server, alice: str,
                                                 database_url: str) -> None:
    # Rows made since then, not all rows: another server's clean-up may remove expired
    # ones meanwhile (the database is the worker's).
    since = fetch(database_url, "SELECT now() AS t")[0]["t"]
    assert start(server, alice, "/datasets/orders.csv?amount=gt.abc").status_code == 400
    assert start(server, alice, "/datasets/orders.csv?nosuchcolumn=eq.1").status_code == 400
    assert start(server, alice, "/datasets/no_such_thing.csv").status_code == 404
    assert start(server, alice, "/files/README.txt").status_code == 400
    assert start(server, alice, "/datasets/orders.csv", coding="br").status_code == 400
    for body in (b"", b"[]", b'{"url": 5}', b"{" * 100_000, b'"x"'):
        r = httpx.post(server.url + "/exports", headers=bearer(alice), content=body)
        assert r.status_code in (400, 413), (body[:20], r.status_code)
    r = httpx.post(server.url + "/exports", json={"url": "/datasets/orders.csv"})
    assert r.status_code == 401  # a closed server: anonymous gets nothing
    only = new_token(database_url, f"only-{os.urandom(3).hex()}", "datasets:daily_revenue")
    assert start(server, only, "/datasets/orders.csv").status_code == 403
    started = fetch(database_url, "SELECT count(*) AS n FROM exporter.stored_exports"
                    " WHERE created >= $1", since)[0]["n"]
    assert started == 0  # nothing was started


def test_others_ids_are_404_and_admins_see_all(server: Server, alice: str, bob: str,
                                               boss: str) -> None:
    m = finished(server, alice, "/datasets/orders.csv?limit=3")
    mine = f"/exports/{m['id']}"
    for path in (mine, mine + "/file"):
        assert httpx.get(server.url + path, headers=bearer(bob)).status_code == 404
        assert httpx.get(server.url + path, headers=bearer(boss)).status_code == 200
    assert httpx.delete(server.url + mine, headers=bearer(bob)).status_code == 404
    assert httpx.get(server.url + mine).status_code == 401
    ids = [e["id"] for e in httpx.get(server.url + "/exports", headers=bearer(alice))
           .json()["exports"]]
    assert m["id"] in ids
    assert m["id"] not in [e["id"] for e in httpx.get(
        server.url + "/exports", headers=bearer(bob)).json()["exports"]]
    assert m["id"] in [e["id"] for e in httpx.get(
        server.url + "/exports", headers=bearer(boss)).json()["exports"]]
    # Newest first.
    created = [e["created"] for e in httpx.get(server.url + "/exports",
                                               headers=bearer(alice)).json()["exports"]]
    assert created == sorted(created, reverse=True)
    # Not someone's id either: never a 500.
    for bad in ("x" * 22, "..%2F" * 8, "%00" * 8, "a%2F..%2Fb", "a" * 10_000,
                m["id"] + "x", m["id"][:-1] + "%00"):
        for suffix in ("", "/file"):
            r = httpx.get(server.url + f"/exports/{bad}{suffix}", headers=bearer(alice))
            assert r.status_code in (400, 404), (bad[:30], r.status_code)
    r = httpx.get(server.url + "/exports/" + "a" * 60_000, headers=bearer(alice))
    assert r.status_code in (404, 414, 431)
    assert httpx.get(server.url + "/exports?limit=0", headers=bearer(alice)).status_code == 400
    assert httpx.get(server.url + "/exports?limit=" + "9" * 5000,
                     headers=bearer(alice)).status_code == 400
    # Removed: gone for everyone, file included.
    assert httpx.delete(server.url + mine, headers=bearer(alice)).status_code == 204
    assert httpx.get(server.url + mine, headers=bearer(alice)).status_code == 404


def test_delete_while_running_cancels_the_query(server: Server, alice: str,
                                                database_url: str) -> None:
    r = start(server, alice, "/datasets/endless.csv")
    location = r.headers["location"]
    assert wait_until(lambda: httpx.get(server.url + location, headers=bearer(alice))
                      .json().get("rows", 0) > 1000, 30)
    assert fetch(database_url, COPIES)
    assert httpx.delete(server.url + location, headers=bearer(alice)).status_code == 204
    assert wait_until(lambda: not fetch(database_url, COPIES), 15), "the COPY still runs"
    s = httpx.get(server.url + location, headers=bearer(alice))
    assert s.status_code == 410 and s.json()["status"] == "cancelled"
    assert "cancelled" in s.json()["error"]
    assert httpx.get(server.url + location + "/file", headers=bearer(alice)).status_code == 410
    export_id = location.rsplit("/", 1)[1]
    folder = Path(server.env["EXPORTER_EXPORTS_DIR"])
    assert wait_until(lambda: not any(p.name.startswith(export_id)
                                      for p in folder.iterdir()), 10)


def test_the_snapshot_goes_when_the_copy_ends(server: Server, alice: str,
                                              database_url: str, tmp_path: Path) -> None:
    m = finished(server, alice, "/datasets/orders.csv")
    slow = subprocess.Popen(["curl", "-sS", "--limit-rate", "20k", "-o", str(tmp_path / "o"),
                             "-H", f"Authorization: Bearer {alice}", m["file_url"]])
    try:
        # Bytes have arrived, and more are to come: the download is under way.
        got = tmp_path / "o"
        assert wait_until(lambda: got.exists() and got.stat().st_size > 0, 30)
        assert slow.poll() is None  # still downloading
        open_snapshots = fetch(database_url, "SELECT pid FROM pg_stat_activity"
                               " WHERE backend_xmin IS NOT NULL AND state LIKE 'idle in%'"
                               " AND pid <> pg_backend_pid()")
        assert open_snapshots == []
        assert fetch(database_url, COPIES) == []
    finally:
        slow.kill()
        slow.wait()


@pytest.mark.needs("curl", "wget", "aria2c")
def test_resumed_by_curl_wget_and_aria2c(server: Server, alice: str, tmp_path: Path) -> None:
    m = finished(server, alice, "/datasets/orders.csv?order=id")
    whole = httpx.get(m["file_url"], headers=bearer(alice)).content
    auth = f"Authorization: Bearer {alice}"
    half = whole[: len(whole) // 2]
    for tool in ("curl", "wget"):
        out = tmp_path / f"{tool}.csv"
        out.write_bytes(half)
        command = (["curl", "-sS", "-f", "-C", "-", "-o", str(out), "-H", auth, m["file_url"]]
                   if tool == "curl" else
                   ["wget", "-q", "-c", "-O", str(out), "--header", auth, m["file_url"]])
        subprocess.run(command, check=True, timeout=60)
        assert out.read_bytes() == whole, tool
    # aria2c: 8 connections, and its own check of the Digest header.
    (tmp_path / "aria").mkdir()
    done = subprocess.run(["aria2c", "-q", "-x", "8", "-s", "8", "-k", "1M", "-c",
                           "--header", auth, "-d", str(tmp_path / "aria"), "-o", "a.csv",
                           m["file_url"]], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "aria" / "a.csv").read_bytes() == whole
    # A multi-range request, and conditions.
    r = httpx.get(m["file_url"], headers={**bearer(alice), "Range": "bytes=0-9,20-29"})
    assert r.status_code == 206 and r.headers["content-type"].startswith("multipart/byteranges")
    etag = r.headers["etag"]
    assert httpx.get(m["file_url"], headers={**bearer(alice), "If-None-Match": etag}
                     ).status_code == 304
    r = httpx.get(m["file_url"], headers={**bearer(alice), "Range": "bytes=5-",
                                          "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == whole
    head = httpx.head(m["file_url"], headers=bearer(alice))
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(whole)


def test_a_signed_link_to_the_file_and_polars(server: Server, alice: str, bob: str,
                                              tmp_path: Path) -> None:
    import polars as pl

    m = finished(server, alice, "/datasets/orders.csv?order=id&limit=1000")
    path = f"/exports/{m['id']}/file"
    link = make_link(server, alice, path)
    whole = httpx.get(link).content
    assert hashlib.sha256(whole).hexdigest() == m["sha256"]
    frame = pl.read_csv(link)
    assert frame.height == 1000 and frame["id"].to_list()[:3] == sorted(frame["id"])[:3]
    # Bob may not link Alice's export: 403, as for an id that does not exist.
    for target in (path, f"/exports/{m['id']}", "/exports/AAAAAAAAAAAAAAAAAAAAAA/file"):
        r = httpx.post(server.url + "/links", headers=bearer(bob), json={"url": target})
        assert r.status_code == 403, (target, r.text)


def test_quota(make_server: type[Server], alice: str, database_url: str,
               tmp_path: Path) -> None:
    # The quota counts the whole deployment's (this database's) stored exports, less the
    # copies of streamed exports, which make room when a kick-off needs it.
    kept = fetch(database_url, "SELECT coalesce(sum(bytes), 0)::bigint AS n FROM"
                 " exporter.stored_exports WHERE status IN ('running', 'complete')"
                 " AND kind <> 'streamed'")[0]["n"]
    env = {**CLOSED, **FAST, "EXPORTER_EXPORTS_DIR": str(tmp_path / "q"),
           "EXPORTER_EXPORTS_QUOTA_PER_PRINCIPAL": "1"}
    # Copies make room whenever an export needs it: the quota over what else is stored.
    with make_server({**env, "EXPORTER_EXPORTS_MAX_BYTES": str(kept + 300_000)}) as s:
        big = start(s, alice, "/datasets/orders.csv")  # about 4 MB: crosses it
        failed = wait_done(s, alice, big.headers["location"])
        assert failed.status_code == 410
        assert "exceeds the storage quota" in failed.json()["error"]
        assert list((tmp_path / "q").iterdir()) == []  # its partial file is gone
        small = finished(s, alice, "/datasets/orders.csv?limit=1000")
        assert 150_000 < small["bytes"] < 300_000
    # The quota lowered below what is stored: a kick-off is refused before it starts
    # (once the copies of streamed exports, which make room, are all gone).
    with make_server({**env, "EXPORTER_EXPORTS_MAX_BYTES": str(kept + 100_000)}) as s:
        r = start(s, alice, "/datasets/orders.csv?limit=1")
        assert r.status_code == 507 and "quota" in r.json()["error"]["message"]
        assert httpx.delete(s.url + f"/exports/{small['id']}", headers=bearer(alice)
                            ).status_code == 204
        assert start(s, alice, "/datasets/orders.csv?limit=1").status_code == 202


def test_retention_and_restart(make_server: type[Server], alice: str, database_url: str,
                               tmp_path: Path) -> None:
    folder = tmp_path / "r"
    env = {**CLOSED, **FAST, "EXPORTER_EXPORTS_DIR": str(folder),
           "EXPORTER_EXPORTS_RETENTION": "3s"}
    with make_server(env) as s:
        m = finished(s, alice, "/datasets/orders.csv?limit=10")
        assert (folder / m["id"]).exists()
        assert wait_until(lambda: httpx.get(s.url + f"/exports/{m['id']}", headers=bearer(alice)
                                            ).status_code == 404, 20)
        assert wait_until(lambda: not (folder / m["id"]).exists(), 10)
        running = start(s, alice, "/datasets/endless.csv").headers["location"]
        assert wait_until(lambda: httpx.get(s.url + running, headers=bearer(alice))
                          .json().get("rows", 0) > 0, 30)
        os.killpg(s.pid, signal.SIGKILL)  # no shutdown at all
        s.process.wait()  # type: ignore[union-attr]
    with make_server(env) as s:
        r = httpx.get(s.url + running, headers=bearer(alice))
        assert wait_until(lambda: httpx.get(s.url + running, headers=bearer(alice))
                          .status_code == 410, 20)
        r = httpx.get(s.url + running, headers=bearer(alice))
        assert r.json()["status"] == "failed"
        assert r.json()["error"] == "the server stopped while it ran"
        export_id = running.rsplit("/", 1)[1]
        assert wait_until(lambda: not (folder / f"{export_id}.part").exists(), 10)


def test_limits_count_running_stored_exports(make_server: type[Server], alice: str,
                                             database_url: str, tmp_path: Path) -> None:
    with make_server({**CLOSED, **FAST, "EXPORTER_EXPORTS_DIR": str(tmp_path / "l"),
                      "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "1",
                      "EXPORTER_LIMIT_WAIT": "0"}) as s:
        # A token of its own: the slots are the deployment's, and a server killed by
        # another test holds its own until its lease runs out.
        carol = new_token(database_url, f"carol-{os.urandom(3).hex()}", "datasets:*")
        running = start(s, carol, "/datasets/endless.csv")
        assert running.status_code == 202
        busy = httpx.get(s.url + "/datasets/orders.csv?limit=1", headers=bearer(carol))
        assert busy.status_code == 429
        assert start(s, carol, "/datasets/orders.csv?limit=1").status_code == 429
        assert httpx.delete(s.url + running.headers["location"], headers=bearer(carol)
                            ).status_code == 204
        assert wait_until(lambda: httpx.get(s.url + "/datasets/orders.csv?limit=1",
                                            headers=bearer(carol)).status_code == 200, 15)


def test_cli_lists_and_deletes(server: Server, alice: str, database_url: str) -> None:
    from tests.support import exporter_cli

    m = finished(server, alice, "/datasets/orders.csv?limit=5")
    env = {"EXPORTER_DATABASE_URL": database_url,
           "EXPORTER_EXPORTS_DIR": server.env["EXPORTER_EXPORTS_DIR"]}
    out = exporter_cli("exports", env=env).stdout
    assert m["id"] in out and "complete" in out
    # What each kind holds, as the quota counts it.
    held = {r["kind"]: r["n"] for r in fetch(
        database_url, "SELECT kind, sum(bytes)::bigint AS n FROM exporter.stored_exports"
        " WHERE status IN ('running', 'complete') GROUP BY kind")}
    assert re.search(rf"^stored exports: \d+ holding {held.get('async', 0):,} bytes", out, re.M)
    assert re.search(rf"^resume copies: \d+ holding {held.get('streamed', 0):,} bytes", out,
                     re.M), out
    assert "deleted" in exporter_cli("exports", "delete", m["id"], env=env).stdout
    assert httpx.get(server.url + f"/exports/{m['id']}", headers=bearer(alice)
                     ).status_code == 404


def _file_rows(database_url: str, export_id: str, count: int = 1) -> list[dict[str, Any]]:
    rows = audited(database_url, "kind = 'stored' AND target LIKE $1", f"{export_id} %",
                   count=count)
    return [{k: r[k] for k in ("kind", "status", "http_status", "bytes", "range")}
            for r in rows]


def test_a_stored_file_download_is_audited(server: Server, alice: str,
                                           database_url: str) -> None:
    m = finished(server, alice, "/datasets/orders.csv?order=id&limit=300")
    whole = httpx.get(m["file_url"], headers=bearer(alice), timeout=30)
    assert whole.status_code == 200 and len(whole.content) == m["bytes"]
    assert _file_rows(database_url, m["id"]) == [
        {"kind": "stored", "status": "complete", "http_status": 200, "bytes": m["bytes"],
         "range": None}]
    part = httpx.get(m["file_url"], headers={**bearer(alice), "Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == whole.content[100:]
    assert _file_rows(database_url, m["id"], 2)[1:] == [
        {"kind": "stored", "status": "complete", "http_status": 206,
         "bytes": m["bytes"] - 100, "range": "bytes=100-"}]


def test_a_resumed_download_is_audited(server: Server, alice: str, database_url: str) -> None:
    url = server.url + "/datasets/orders.csv?order=id&limit=2000&amount=gt.-1"
    auth = {**bearer(alice), "Accept-Encoding": "identity"}
    first = httpx.get(url, headers=auth, timeout=30)
    assert first.status_code == 200
    copy_id = first.headers["etag"].strip('"')
    rest = httpx.get(url, headers={**auth, "Range": "bytes=100-",
                                   "If-Range": first.headers["etag"]}, timeout=30)
    assert rest.status_code == 206 and rest.content == first.content[100:]
    assert _file_rows(database_url, copy_id) == [
        {"kind": "stored", "status": "complete", "http_status": 206,
         "bytes": len(first.content) - 100, "range": "bytes=100-"}]


def test_a_stored_export_of_a_dataset_made_private_is_gone_for_anonymous(
        make_server: type[Server], tmp_path: Path) -> None:
    env = {**FAST, "EXPORTER_EXPORTS_DIR": str(tmp_path / "p"),
           "EXPORTER_PUBLIC_DATASETS": '["orders"]', "EXPORTER_PUBLIC_FILES": "[]"}
    with make_server(env) as s:
        r = httpx.post(s.url + "/exports", json={"url": "/datasets/orders.csv?limit=10"})
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        done = wait_done(s, "", location)
        assert done.status_code == 200, done.text
        assert httpx.get(s.url + location + "/file").status_code == 200
    # The same database and folder, orders no longer public (files still are: an
    # anonymous client with some scope gets 404 for the id, as for one that is not there).
    env.update({"EXPORTER_PUBLIC_DATASETS": "[]", "EXPORTER_PUBLIC_FILES": '["nested/"]'})
    with make_server(env) as s:
        for method, path in (("GET", location), ("GET", location + "/file"),
                             ("HEAD", location + "/file"), ("DELETE", location)):
            r = httpx.request(method, s.url + path)
            assert r.status_code == 404, (method, path, r.status_code)
        assert httpx.get(s.url + "/exports").json() == {"exports": []}
    # Nothing public at all: credentials are asked for, whatever the id.
    env["EXPORTER_PUBLIC_FILES"] = "[]"
    with make_server(env) as s:
        assert httpx.get(s.url + location + "/file").status_code == 401


def test_a_narrowed_token_loses_its_stored_exports_copies_and_links(
        server: Server, database_url: str) -> None:
    name = f"narrowed-{os.urandom(3).hex()}"
    token = new_token(database_url, name, "datasets:orders")
    m = finished(server, token, "/datasets/orders.csv?order=id&limit=50")
    url = server.url + "/datasets/orders.csv?order=id&limit=3000&amount=gt.-2"
    auth = {**bearer(token), "Accept-Encoding": "identity"}
    first = httpx.get(url, headers=auth, timeout=30)
    copy = first.headers["content-location"]
    link = make_link(server, token, m["file_url"].removeprefix(server.url))
    assert httpx.get(link).status_code == 200
    assert httpx.get(server.url + copy, headers=auth).status_code == 200
    run_sql(database_url, f"UPDATE exporter.tokens SET scopes = '{{files:nested/}}'"
            f" WHERE name = '{name}'")
    # The server hears of the change within a second (token_cache.py, LISTEN/NOTIFY);
    # from then on every request sees the token's scopes as they are now.
    assert wait_until(lambda: httpx.get(server.url + f"/exports/{m['id']}",
                                        headers=auth).status_code == 404, 1)
    for path in (f"/exports/{m['id']}", f"/exports/{m['id']}/file", copy):
        assert httpx.get(server.url + path, headers=auth).status_code == 404, path
    assert httpx.get(link).status_code == 404
    resumed = httpx.get(url, headers={**auth, "Range": "bytes=100-",
                                      "If-Range": first.headers["etag"]})
    assert resumed.status_code == 403
    for target in (f"/exports/{m['id']}/file", copy):
        r = httpx.post(server.url + "/links", headers=bearer(token), json={"url": target})
        assert r.status_code == 403, (target, r.text)
    assert httpx.get(server.url + "/exports", headers=auth).json() == {"exports": []}
    assert httpx.delete(server.url + f"/exports/{m['id']}", headers=auth).status_code == 404
    # Given back its scope, it has them all again.
    run_sql(database_url, f"UPDATE exporter.tokens SET scopes = '{{datasets:orders}}'"
            f" WHERE name = '{name}'")
    assert wait_until(lambda: httpx.get(m["file_url"], headers=auth).status_code == 200, 1)
    assert len(httpx.get(server.url + "/exports", headers=auth).json()["exports"]) == 2


def test_listing_by_kind_keeps_prepared_exports_among_many_copies(
        server: Server, database_url: str) -> None:
    token = new_token(database_url, f"lister-{os.urandom(3).hex()}", "datasets:*")
    prepared = finished(server, token, "/datasets/orders.csv?limit=5")
    auth = {**bearer(token), "Accept-Encoding": "identity"}
    for i in range(21):  # newer than it: resume copies of streamed downloads
        r = httpx.get(f"{server.url}/datasets/orders.csv?limit={i + 1}", headers=auth)
        assert r.status_code == 200 and "content-location" in r.headers

    def listed(query: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{server.url}/exports?{query}", headers=auth)
        assert r.status_code == 200, r.text
        exports: list[dict[str, Any]] = r.json()["exports"]
        return exports

    assert [x["id"] for x in listed("kind=async&limit=20")] == [prepared["id"]]
    copies = listed("kind=copy&limit=20")
    assert len(copies) == 20 and {x["kind"] for x in copies} == {"streamed"}
    # The same exports by either name (by id: a copy's expiry may still be shortened to a
    # minute in between, once its download is known to have been sent whole).
    assert [x["id"] for x in listed("kind=streamed&limit=20")] == [x["id"] for x in copies]
    assert prepared["id"] not in [x["id"] for x in listed("limit=20")]  # newest first
    for bad in ("bogus", "", "ASYNC", "async,copy"):
        r = httpx.get(f"{server.url}/exports", params={"kind": bad}, headers=auth)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["parameter"] == "kind"


def test_the_copy_of_a_download_sent_whole_is_kept_a_minute(server: Server, alice: str,
                                                            database_url: str) -> None:
    r = httpx.get(server.url + "/datasets/orders.csv?order=id&limit=100&amount=gt.-5",
                  headers={**bearer(alice), "Accept-Encoding": "identity"})
    assert r.status_code == 200
    copy_id = r.headers["etag"].strip('"')
    query = ("SELECT status, delivered, bytes, extract(epoch FROM expires - finished) AS kept"
             " FROM exporter.stored_exports WHERE id = $1")
    assert wait_until(lambda: fetch(database_url, query, copy_id)[0]["status"] == "complete", 20)
    assert wait_until(lambda: fetch(database_url, query, copy_id)[0]["kept"] == 60, 10), \
        fetch(database_url, query, copy_id)
    row = fetch(database_url, query, copy_id)[0]
    assert row["delivered"] == row["bytes"] == len(r.content)


# --- the file's URL names the file (issue 23) ---------------------------------------------


def test_the_file_url_ends_with_the_file_name(server: Server, alice: str, bob: str) -> None:
    """`/exports/ID/orders-...csv.gz`: what the manifest gives; `/exports/ID/file` stays an
    alias (links signed for it, scripts that saved it); another name is a 404 naming the
    right one."""
    m = finished(server, alice, "/datasets/orders.csv.gz?order=id&limit=300")
    assert m["file_url"] == f"{server.url}/exports/{m['id']}/{m['filename']}"
    named = httpx.get(m["file_url"], headers=bearer(alice), timeout=30)
    alias = httpx.get(f"{server.url}/exports/{m['id']}/file", headers=bearer(alice), timeout=30)
    assert named.status_code == alias.status_code == 200
    assert named.content == alias.content and len(named.content) == m["bytes"]
    assert named.headers["content-length"] == str(m["bytes"])
    assert named.headers["etag"] == alias.headers["etag"]
    head = httpx.head(m["file_url"], headers=bearer(alice), timeout=30)
    assert head.status_code == 200 and head.headers["content-length"] == str(m["bytes"])
    # The listing's status documents name it too.
    listed = httpx.get(server.url + "/exports?kind=async&limit=100", headers=bearer(alice),
                       timeout=30).json()["exports"]
    assert {x["id"]: x for x in listed}[m["id"]]["file_url"] == m["file_url"]
    wrong = httpx.get(f"{server.url}/exports/{m['id']}/orders.csv", headers=bearer(alice))
    assert wrong.status_code == 404 and m["filename"] in wrong.json()["message"]
    # Someone else's export, by its right name: 404 as any id they cannot see.
    other = httpx.get(m["file_url"], headers=bearer(bob))
    assert other.status_code == 404 and m["filename"] not in other.text
    # Nor may they link it (403, as for an id that does not exist).
    r = httpx.post(server.url + "/links", headers=bearer(bob),
                   json={"url": f"/exports/{m['id']}/{m['filename']}"})
    assert r.status_code == 403, r.text


@pytest.mark.needs("wget", "curl")
def test_wget_and_curl_o_save_the_file_under_its_name(server: Server, alice: str,
                                                      tmp_path: Path) -> None:
    m = finished(server, alice, "/datasets/orders.csv.gz?order=id&limit=50")
    auth = f"Authorization: Bearer {alice}"
    for folder, command in (("wget", ["wget", "-q", "--header", auth, m["file_url"]]),
                            ("curl", ["curl", "-fsSO", "-H", auth, m["file_url"]])):
        (tmp_path / folder).mkdir()
        subprocess.run(command, cwd=tmp_path / folder, check=True, timeout=60)
        saved = tmp_path / folder / m["filename"]
        assert saved.exists(), list((tmp_path / folder).iterdir())
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == m["sha256"]


@pytest.mark.parametrize("url", ["/datasets/orders.csv.gz?order=id&limit=700",
                                 "/datasets/orders.csv?order=id&limit=700"])
def test_readers_open_a_signed_link_to_the_file(server: Server, alice: str,
                                                database_url: str, url: str) -> None:
    """polars, pandas and DuckDB read the signed link as it is (no headers), gzip or not:
    the URL ends with the file's name and the answer has a Content-Length."""
    import duckdb
    import pandas as pd
    import polars as pl

    m = finished(server, alice, url)
    link = make_link(server, alice, f"/exports/{m['id']}/{m['filename']}")
    expected = [r["id"] for r in fetch(database_url,
                                       "SELECT id FROM exports.orders ORDER BY id LIMIT 700")]
    assert pl.read_csv(link)["id"].to_list() == expected
    connection = duckdb.connect()
    try:
        _load_httpfs(connection)
        rows = connection.sql(f"SELECT id FROM read_csv('{link}') ORDER BY id").fetchall()
    finally:
        connection.close()
    assert [r[0] for r in rows] == expected
    # pandas goes by the URL's ending, which a link's signature follows: told the coding.
    coding = "gzip" if m["filename"].endswith(".gz") else None
    assert pd.read_csv(link, compression=coding)["id"].to_list() == expected
    # With a token as a header, the URL ends with the file's name: pandas sees it.
    assert pd.read_csv(m["file_url"], storage_options=bearer(alice))["id"].to_list() == expected


def _load_httpfs(connection: Any) -> None:
    """DuckDB's httpfs from its wheel (duckdb-extension-httpfs), never downloaded."""
    import duckdb_extension_httpfs

    found = next(Path(duckdb_extension_httpfs.__file__).parent.glob(
        "extensions/*/httpfs.duckdb_extension"))
    connection.sql(f"LOAD '{found}'")
