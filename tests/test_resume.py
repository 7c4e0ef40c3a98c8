"""Resuming a broken streamed export with the tools people use, never splicing two
snapshots: each resumed file equals a whole download of the snapshot it began with,
also when rows changed in between; a resume that cannot be proved gets a whole 200."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dropper import DroppingProxy
from tests.support import Server, audited, fetch, run_sql, wait_until
from tests.test_access import new_token

ROWS = 1_000_000
SOME = 100_000  # for the tests that need not cut the whole table at half
RATE = "10M"  # slow enough to cut a download at half (35 MB), fast enough for the suite
# httpx asks for zstd by itself; a compressed answer has no copy (its bytes are not the
# copy's). curl and wget ask for identity unless told otherwise.
IDENTITY = {"Accept-Encoding": "identity"}

# On one worker: the 1,000,000-row table is made once, and the downloads do not compete.
pytestmark = [pytest.mark.needs("curl", "wget"), pytest.mark.xdist_group("resume")]


TABLE = "resume_rows"


@pytest.fixture
def table(database_url: str) -> str:
    """A 1,000,000-row table for this module's tests, made once in each test database
    (and gone with it). Not a fixture of a wider scope: those are made again whenever a
    test on another PostgreSQL version runs between two of these."""
    if fetch(database_url, "SELECT to_regclass($1) AS t", f"exports.{TABLE}")[0]["t"] is None:
        run_sql(database_url,
                f"CREATE TABLE exports.{TABLE} (id bigint PRIMARY KEY, note text NOT NULL)",
                f"INSERT INTO exports.{TABLE}"
                f" SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g")
    return TABLE


@pytest.fixture(scope="module")
def server(make_module_server: type[Server]) -> Server:
    """The exporter with the default time to complete a copy after its client left (the
    suite's other servers get 3 s, see tests/support.py)."""
    s: Server = make_module_server({"EXPORTER_EXPORTS_RESUME_FINISH": "300"}).start()
    return s


@pytest.fixture
def restore(database_url: str, table: str) -> Iterator[None]:
    yield
    run_sql(database_url, f"UPDATE exports.{table} SET note = md5(id::text)"
            " WHERE note <> md5(id::text)")


@pytest.fixture(scope="module")
def token(database_url: str) -> str:
    return new_token(database_url, f"resume-{uuid.uuid4().hex[:8]}", "datasets:*")


def _change_rows(database_url: str, table: str) -> None:
    # Rows in the first half and in the second: whatever part a resume sends, it differs.
    run_sql(database_url, f"UPDATE exports.{table} SET note = 'changed' WHERE id % 1000 = 7")


# Each test asks for its own URL (a filter that keeps every row): copies are looked up by
# principal and URL, and those an earlier test left must not be this test's candidates.


def _whole(url: str) -> bytes:
    r = httpx.get(url, headers=IDENTITY, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


def _cut_early(url: str, after: int, headers: dict[str, str] = IDENTITY) -> str:
    """A download of `url` whose client leaves once it has `after` bytes; its ETag."""
    with httpx.stream("GET", url, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        got = 0
        for chunk in r.iter_raw():
            got += len(chunk)
            if got > after:
                break
        return r.headers["etag"]


def _cut_at_half(command: list[str], out: Path, size: int, cwd: Path) -> None:
    """Run a download and kill it (SIGKILL: no goodbye) once it has half the bytes."""
    p = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and out.stat().st_size >= size // 2, 60), \
            p.stderr.read() if p.poll() is not None and p.stderr else "too slow"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert 0 < out.stat().st_size < size


def _copy_status(server: Server, location: str) -> dict[str, object]:
    status_url = server.url + location.rsplit("/", 1)[0]
    r = httpx.get(status_url, timeout=30)
    assert r.status_code in (200, 202), r.text
    body: dict[str, object] = r.json()
    return body


def test_curl_killed_at_half_resumes_with_the_same_snapshot(
    server: Server, database_url: str, table: str, restore: None, tmp_path: Path
) -> None:
    url = f"{server.url}/datasets/{table}.csv?order=id&note=neq.curl-kill"
    before = _whole(url)
    out = tmp_path / "out.csv"
    _cut_at_half(["curl", "-sS", "--limit-rate", RATE, "-o", str(out), url], out,
                 len(before), tmp_path)
    _change_rows(database_url, table)
    done = subprocess.run(["curl", "-sS", "-C", "-", "-o", str(out), url], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == before  # the first snapshot's bytes, whole
    assert _whole(url) != before  # the change is real: a new export shows it


def test_a_streamed_export_names_its_copy_which_is_completed_after_the_client_left(
    server: Server, database_url: str, table: str, tmp_path: Path
) -> None:
    # The whole table (35 MB): more than the loopback sockets' buffers hold, so the server
    # is still sending when its client leaves (a smaller export may all be in the buffers
    # by then, its download complete).
    url = f"{server.url}/datasets/{table}.csv?order=id&note=neq.copy"
    with httpx.stream("GET", url, headers=IDENTITY, timeout=60) as r:
        assert r.status_code == 200
        etag, location = r.headers["etag"], r.headers["content-location"]
        # Its URL serves a range only as a proven continuation: no promise of ranges
        # (the copy's own URL makes it, tests/test_exports.py).
        assert r.headers["accept-ranges"] == "none"
        assert etag.startswith('"') and not etag.startswith('W/')
        got = 0
        for chunk in r.iter_raw():
            got += len(chunk)
            if got > 1_000_000:
                break  # leave early
    assert wait_until(lambda: _copy_status(server, location)["status"] == "complete", 60)
    whole = httpx.get(server.url + location, headers=IDENTITY, timeout=60)
    assert whole.status_code == 200
    assert whole.content == _whole(url)  # nothing changed: the same bytes
    assert whole.content.count(b"\n") == ROWS + 1
    # The client's own download was not complete, whatever its copy became.
    # The table is shared by this module's tests: this test's own downloads (its URL).
    rows = audited(database_url, "target = $1 AND params::text LIKE '%neq.copy%'", table)
    assert rows[0]["status"] == "aborted"
    # If-Range with the copy's ETag: the rest of exactly those bytes.
    rest = httpx.get(url, headers={**IDENTITY, "Range": f"bytes={got}-", "If-Range": etag},
                     timeout=60)
    assert rest.status_code == 206, rest.text
    assert rest.headers["etag"] == etag
    assert rest.content == whole.content[got:]


@pytest.mark.needs("wget")
def test_wget_c_after_a_kill_resumes_with_the_same_snapshot(
    server: Server, database_url: str, table: str, restore: None, tmp_path: Path
) -> None:
    url = f"{server.url}/datasets/{table}.csv?order=id&note=neq.wget-c"
    before = _whole(url)
    out = tmp_path / "out.csv"
    _cut_at_half(["wget", "-q", f"--limit-rate={RATE}", "-O", str(out), url], out,
                 len(before), tmp_path)
    _change_rows(database_url, table)
    done = subprocess.run(["wget", "-q", "-c", "-O", str(out), url], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == before


def test_plain_wget_retries_by_itself_through_a_proxy_that_drops_it(
    server: Server, database_url: str, table: str, restore: None, tmp_path: Path
) -> None:
    url_path = f"/datasets/{table}.csv?order=id&note=neq.wget-retry"
    before = _whole(server.url + url_path)
    # Torn down (a reset): wget 1.21 takes a clean close inside a chunked body for its
    # end, keeps the short file and exits 0 (docs/internals.md: use curl, or a stored export).
    with DroppingProxy(server.port, cut_after=len(before) // 2, reset=True) as proxy:
        out = tmp_path / "out.csv"
        p = subprocess.Popen(["wget", "-O", str(out), "--tries=5", "--waitretry=1",
                              "--retry-connrefused", proxy.url + url_path],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The rows change between the drop and wget's retry.
        assert wait_until(lambda: proxy.cut == 1, 60)
        _change_rows(database_url, table)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert proxy.connections == 2, err  # one retry, which continued
    assert b"206 Partial Content" in err
    assert out.read_bytes() == before


def test_curl_through_a_proxy_that_drops_it_resumes_with_c(
    server: Server, database_url: str, table: str, restore: None, tmp_path: Path
) -> None:
    url_path = f"/datasets/{table}.csv?order=id&note=neq.curl-proxy"
    before = _whole(server.url + url_path)
    out = tmp_path / "out.csv"
    # A clean close inside the chunked body (as a proxy's idle timeout ends one).
    with DroppingProxy(server.port, cut_after=len(before) // 2) as proxy:
        first = subprocess.run(["curl", "-sS", "-o", str(out), proxy.url + url_path],
                               cwd=tmp_path, capture_output=True, timeout=120)
        assert first.returncode == 18, first.stderr  # broken, and it looks broken
        _change_rows(database_url, table)
        done = subprocess.run(["curl", "-sS", "-C", "-", "-o", str(out), proxy.url + url_path],
                              cwd=tmp_path, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert out.read_bytes() == before


def test_a_resume_that_cannot_be_proved_gets_the_whole_export(
    server: Server, database_url: str, table: str, restore: None, tmp_path: Path
) -> None:
    url = f"{server.url}/datasets/{table}.csv?order=id&note=neq.unproved&limit={SOME}"
    first = _whole(url)
    # Beyond anything a response of this URL sent: not a continuation of it.
    r = httpx.get(url, headers={**IDENTITY, "Range": f"bytes={len(first) + 10}-"}, timeout=60)
    assert r.status_code == 200 and r.content == first
    # An If-Range that names no copy of this URL.
    r = httpx.get(url, headers={**IDENTITY, "Range": "bytes=10-", "If-Range": '"not-a-copy"'},
                  timeout=60)
    assert r.status_code == 200 and r.content == first
    # Another URL's copy does not continue this one.
    other = httpx.get(f"{server.url}/datasets/{table}.csv?order=id&limit=5", headers=IDENTITY,
                      timeout=60)
    r = httpx.get(url, headers={**IDENTITY, "Range": "bytes=10-",
                                "If-Range": other.headers["etag"]}, timeout=60)
    assert r.status_code == 200 and r.content == first
    # Two downloads of this URL cut early, whose bytes differ before the offset: which
    # one the client holds cannot be told, so neither is spliced on.
    for change in ("", f"UPDATE exports.{table} SET note = 'first row changed' WHERE id = 1"):
        if change:
            run_sql(database_url, change)
        _cut_early(url, 5000)
    out = tmp_path / "out.csv"
    out.write_bytes(first[:1000])
    done = subprocess.run(["curl", "-sS", "-C", "-", "-o", str(out), url], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert done.returncode == 33, done.stderr  # curl refuses a 200: nothing spliced
    assert out.read_bytes() == first[:1000]
    # A Range with a unit or a form that is not `bytes=N-`: a whole 200, never a 416/500.
    for value in ("items=0-9", "bytes=0-4,10-20", "bytes=-500", "bytes=" + "9" * 5000 + "-"):
        r = httpx.get(f"{server.url}/datasets/{table}.csv?limit=3",
                      headers={**IDENTITY, "Range": value}, timeout=60)
        assert r.status_code == 200, (value, r.status_code)


def test_a_response_sent_whole_may_be_what_the_client_holds(
    server: Server, database_url: str, table: str, restore: None, tmp_path: Path
) -> None:
    """Sent whole is written to the socket, not received: a client killed with the rest
    in its buffers holds a part of it. A later response of the URL, cut, with other bytes
    before the offset, is no proof of which one the client holds: the whole export."""
    url = f"{server.url}/datasets/{table}.csv?order=id&note=neq.sentwhole&limit={SOME}"
    first = _whole(url)  # its copy: sent whole
    run_sql(database_url, f"UPDATE exports.{table} SET note = 'changed after' WHERE id = 1")
    _cut_early(url, 5000)  # cut: its copy is the only one left cut after the offset
    out = tmp_path / "out.csv"
    out.write_bytes(first[:1000])  # the part of the first response this client got
    done = subprocess.run(["curl", "-sS", "-C", "-", "-o", str(out), url], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert done.returncode == 33, done.stderr  # a 200: nothing spliced
    assert out.read_bytes() == first[:1000]


def test_another_principal_cannot_resume_from_a_copy(
    server: Server, database_url: str, table: str, token: str
) -> None:
    url = f"{server.url}/datasets/{table}.csv?order=id&note=neq.other&limit={SOME}"
    first = _whole(url)
    r = httpx.get(url, headers={**IDENTITY, "Range": "bytes=10-",
                                "Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200 and r.content == first


def test_rows_are_not_held_open_by_a_resume(server: Server, database_url: str) -> None:
    """A resume is served from the copy's file: no snapshot, no COPY on the database."""
    url = f"{server.url}/datasets/orders.csv?order=id&limit=200001"
    with httpx.stream("GET", url, headers=IDENTITY, timeout=60) as r:
        etag = r.headers["etag"]
        r.read()
    with httpx.stream("GET", url, headers={**IDENTITY, "Range": "bytes=100-", "If-Range": etag},
                      timeout=60) as r:
        assert r.status_code == 206
        busy = fetch(database_url, "SELECT count(*) AS n FROM pg_stat_activity"
                     " WHERE query LIKE 'COPY%LIMIT 200001%' AND state = 'active'"
                     " AND pid <> pg_backend_pid()")
        r.read()
    assert busy[0]["n"] == 0


@pytest.fixture(scope="module")
def endless(database_url: str) -> None:
    # Hours of output (generate_series in the select list streams).
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.endless AS"
            " SELECT generate_series(1, 1000000000) AS id, repeat('x', 200) AS pad")


def test_a_copy_completed_after_its_client_left_holds_its_slot_and_has_a_time_limit(
    make_server: type[Server], database_url: str, endless: None, token: str
) -> None:
    # The quota out of the way (this is about the time limit): 4 s of an endless COPY on a
    # quiet machine, with the copies the worker's earlier tests keep for an hour, once
    # crossed the copies' share of the default 10 GiB first.
    s = make_server({"EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "1",
                     "EXPORTER_LIMIT_WAIT": "0", "EXPORTER_EXPORTS_RESUME_FINISH": "4",
                     "EXPORTER_EXPORTS_MAX_BYTES": str(1024**4)}).start()
    auth = {**IDENTITY, "Authorization": f"Bearer {token}"}
    with httpx.stream("GET", s.url + "/datasets/endless.csv", headers=auth, timeout=30) as r:
        assert r.status_code == 200
        location = r.headers["content-location"]
        next(r.iter_raw())
    left = time.monotonic()
    # The COPY goes on into the copy: still this client's work, under its cap.
    assert httpx.get(s.url + "/datasets/orders.csv?limit=1", headers=auth,
                     timeout=30).status_code == 429
    status_url = s.url + location.rsplit("/", 1)[0]

    def ended() -> dict[str, object] | None:
        body: dict[str, object] = httpx.get(status_url, headers=auth, timeout=30).json()
        return body if body["status"] != "running" else None

    assert wait_until(ended, 60)
    assert time.monotonic() - left >= 3.5  # the limit, not before
    status = ended()
    assert status is not None and status["status"] == "failed"
    assert "took more than 4 s" in str(status["error"])
    # The slot is back, and the database let go of the COPY.
    assert wait_until(lambda: httpx.get(s.url + "/datasets/orders.csv?limit=1", headers=auth,
                                        timeout=30).status_code == 200, 20)
    assert wait_until(lambda: not fetch(
        database_url, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'exporter'"
        " AND datname = current_database() AND state = 'active' AND query LIKE 'COPY%'"), 20)
    # Nothing of it is left in the storage's folder but what its row says.
    assert httpx.get(s.url + location, headers=auth, timeout=30).status_code == 410


def test_copies_make_room_for_stored_exports_and_stay_refused_for_resuming(
    server: Server, make_server: type[Server], database_url: str, token: str, table: str
) -> None:
    # The whole table (35 MB): a download cut early is never sent whole (6 MB could all be
    # in the loopback sockets' buffers by then, and a copy of a download sent whole goes
    # first, whatever its age).
    path = f"/datasets/{table}.csv?order=id&note=neq.room"
    size = len(_whole(server.url + path))
    # Room for exactly two copies of it. The quota is the database's (every server shares
    # it): what earlier tests stored is removed first, by an admin, once it is finished.
    s = make_server({"EXPORTER_EXPORTS_MAX_BYTES": str(2 * size),
                     "EXPORTER_EXPORTS_RESUME_SHARE": "1"}).start()
    admin = {"Authorization": "Bearer " + new_token(
        database_url, f"resume-admin-{uuid.uuid4().hex[:8]}", "admin")}
    running = "SELECT count(*) AS n FROM exporter.stored_exports WHERE status = 'running'"
    assert wait_until(lambda: fetch(database_url, running)[0]["n"] == 0, 60)
    for export in httpx.get(s.url + "/exports?limit=1000", headers=admin).json()["exports"]:
        assert httpx.delete(f"{s.url}/exports/{export['id']}", headers=admin).status_code == 204
    auth = {**IDENTITY, "Authorization": f"Bearer {token}"}
    statuses = []
    for _ in range(2):  # two downloads of the URL, both cut early
        with httpx.stream("GET", s.url + path, headers=auth, timeout=60) as r:
            assert r.status_code == 200
            status = s.url + r.headers["content-location"].rsplit("/", 1)[0]
            statuses.append(status)
            next(r.iter_raw())
        # Each copy completed before the next download starts: the oldest copy is the
        # first (two completed at once finished in either order).
        assert wait_until(lambda: httpx.get(status, headers=auth).json()["status"]  # noqa: B023
                          == "complete", 30), httpx.get(status, headers=auth).json()["error"]
    # The quota is full: a stored export still starts, the oldest copies go (earlier
    # tests' first, then the first of these two).
    started = httpx.post(s.url + "/exports", headers=auth, timeout=60,
                         json={"url": "/datasets/orders.csv?limit=10"})
    assert started.status_code == 202, started.text
    gone = httpx.get(statuses[0], headers=auth, timeout=30)
    assert gone.status_code == 410 and "make room" in gone.json()["error"], gone.text
    assert httpx.get(statuses[1], headers=auth, timeout=30).json()["status"] == "complete"
    # A resume could be of either download: the one whose copy is gone might be the
    # client's, so the other is not spliced on. The whole export.
    r = httpx.get(s.url + path, headers={**auth, "Range": "bytes=10-"}, timeout=60)
    assert r.status_code == 200


def test_a_copy_the_quota_refuses_costs_the_download_nothing(
    make_server: type[Server], token: str
) -> None:
    """The copy's room, row and file are made while the first chunk leaves, after its ETag
    is promised (the time to the first byte): a copy that cannot be begun leaves the
    download whole, and a resume that names it gets the whole export, never a splice."""
    s = make_server({"EXPORTER_EXPORTS_MAX_BYTES": "1"}).start()
    path = "/datasets/orders.csv?select=id,customer&order=id&limit=2000"
    auth = {**IDENTITY, "Authorization": f"Bearer {token}"}
    r = httpx.get(s.url + path, headers=auth, timeout=60)
    assert r.status_code == 200
    assert r.content.count(b"\n") == 2001
    etag, location = r.headers["etag"], r.headers["content-location"]
    assert wait_until(lambda: "goes without a copy" in s.log(), 30)
    assert httpx.get(s.url + location, headers=auth, timeout=30).status_code == 404
    rest = httpx.get(s.url + path, headers={**auth, "Range": "bytes=100-", "If-Range": etag},
                     timeout=60)
    assert rest.status_code == 200
    assert rest.content == r.content


def test_a_resume_never_splices_two_formats(server: Server, table: str) -> None:
    """A copy is found by its representation, not by its URL alone: the suffix-less URL
    negotiated as NDJSON and cut is no copy of the same URL asked for as CSV."""
    url = f"{server.url}/datasets/{table}?order=id&note=neq.formats&limit={SOME}"
    ndjson = {**IDENTITY, "Accept": "application/x-ndjson"}
    with httpx.stream("GET", url, headers=ndjson, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        etag = r.headers["etag"]
        got = 0
        for chunk in r.iter_raw():
            got += len(chunk)
            if got > 100_000:
                break  # leave early: the copy is completed without the client
    csv = httpx.get(url, headers={**IDENTITY, "Accept": "text/csv"}, timeout=60)
    assert csv.status_code == 200 and csv.content.startswith(b"id,note\n")
    # The CSV asked for from byte 100: the CSV's own copy continues it (sent whole is
    # not received whole), never the NDJSON's.
    rest = httpx.get(url, headers={**IDENTITY, "Accept": "text/csv", "Range": "bytes=100-"},
                     timeout=60)
    assert rest.status_code == 206, rest.headers
    assert rest.content == csv.content[100:]
    assert rest.headers["etag"] == csv.headers["etag"] != etag
    # Its If-Range names the NDJSON's copy: not these bytes either.
    rest = httpx.get(url, headers={**IDENTITY, "Accept": "text/csv", "Range": "bytes=100-",
                                   "If-Range": etag}, timeout=60)
    assert rest.status_code == 200 and rest.content == csv.content
    # The NDJSON, the same representation by either spelling: the rest of the cut copy.
    whole = httpx.get(url, headers=ndjson, timeout=60).content
    rest = httpx.get(url, headers={**ndjson, "Range": "bytes=100-", "If-Range": etag},
                     timeout=60)
    assert rest.status_code == 206 and rest.content == whole[100:]
    suffixed = url.replace(f"/{table}?", f"/{table}.ndjson?")
    rest = httpx.get(suffixed, headers={**IDENTITY, "Range": "bytes=100-"}, timeout=60)
    assert rest.status_code == 206 and rest.content == whole[100:]


@pytest.mark.parametrize("extension", ["xlsx", "parquet"])
def test_curl_resumes_a_binary_format_from_its_own_copy(server: Server, table: str,
                                                        tmp_path: Path, extension: str) -> None:
    """The binary formats (a ZIP made as it goes, Parquet from the ADBC driver) are
    copied as they leave like CSV: `curl -C -` of a cut download gets the rest of the
    same bytes, and the file opens."""
    url = f"{server.url}/datasets/{table}.{extension}?order=id&limit={SOME}"
    out = tmp_path / f"out.{extension}"
    with httpx.stream("GET", url, headers=IDENTITY, timeout=60) as r:
        assert r.status_code == 200
        head = b""
        for chunk in r.iter_raw():
            head += chunk
            if len(head) > 20_000:
                break
    out.write_bytes(head)
    done = subprocess.run(["curl", "-fsS", "-C", "-", "-o", str(out), url], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if extension == "parquet":
        import pyarrow.parquet as pq

        got = pq.read_table(out)
        assert got.num_rows == SOME and got.column("id").to_pylist()[:3] == [1, 2, 3]
    else:
        import zipfile

        with zipfile.ZipFile(out) as z:
            assert z.testzip() is None
            sheet = z.read("xl/worksheets/sheet1.xml")
        assert sheet.count(b"<row") == SOME + 1  # and the header
