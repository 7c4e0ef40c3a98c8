"""File serving through real HTTP: headers, conditions, ranges, real download tools, digests."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from exporter.files.demo import LARGE_NAME, UNICODE_NAME
from exporter.files.stream import read_cached
from tests.conftest import LARGE_FILE_SIZE
from tests.support import ROOT, Server, audited, fetch, forked, last_audit_id, sha256, wait_until

MiB = 1024 * 1024


def url(server: Server, name: str) -> str:
    return f"{server.url}/files/{quote(name)}"


def test_head_has_the_get_headers(server: Server, files_root: Path) -> None:
    head = httpx.head(url(server, "README.txt"))
    get = httpx.get(url(server, "README.txt"))
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert get.content == (files_root / "README.txt").read_bytes()
    for name in ("content-type", "content-length", "etag", "last-modified", "accept-ranges",
                 "content-disposition"):
        assert head.headers[name] == get.headers[name], name
    assert get.headers["content-type"] == "text/plain; charset=utf-8"
    assert get.headers["accept-ranges"] == "bytes"
    assert get.headers["content-disposition"] == 'attachment; filename="README.txt"'
    assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+-[0-9a-f]+"', get.headers["etag"])
    st = (files_root / "README.txt").stat()
    assert get.headers["content-length"] == str(st.st_size)


def test_inline_and_bad_disposition(server: Server) -> None:
    r = httpx.get(url(server, "nested/data.json"), params={"disposition": "inline"})
    assert r.headers["content-disposition"] == 'inline; filename="data.json"'
    assert r.headers["content-type"] == "application/json"
    bad = httpx.get(url(server, "nested/data.json"), params={"disposition": "evil"})
    assert bad.status_code == 400 and bad.json()["error"]["parameter"] == "disposition"


def test_empty_file(server: Server) -> None:
    r = httpx.get(url(server, "empty.bin"))
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
    r = httpx.get(url(server, "empty.bin"), headers={"Range": "bytes=0-"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */0"


def test_non_ascii_name_header(server: Server) -> None:
    r = httpx.head(url(server, UNICODE_NAME))
    value = r.headers["content-disposition"]
    assert value.startswith('attachment; filename="')
    assert "filename*=UTF-8''" + quote(UNICODE_NAME, safe="!#$&+-.^_`|~") in value


def test_etag_and_last_modified_change_with_the_file(server: Server, files_root: Path) -> None:
    f = files_root / "changing.txt"
    f.write_bytes(b"first")
    first = httpx.head(url(server, "changing.txt")).headers
    f.write_bytes(b"other")  # same size
    second = httpx.head(url(server, "changing.txt")).headers
    assert first["etag"] != second["etag"]


def test_conditional_requests(server: Server) -> None:
    target = url(server, "README.txt")
    r = httpx.get(target)
    etag, modified = r.headers["etag"], r.headers["last-modified"]

    r = httpx.get(target, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert httpx.get(target, headers={"If-None-Match": f"W/{etag}"}).status_code == 304
    assert httpx.head(target, headers={"If-None-Match": etag}).status_code == 304
    assert httpx.get(target, headers={"If-None-Match": '"other"'}).status_code == 200
    assert httpx.get(target, headers={"If-Modified-Since": modified}).status_code == 304
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    assert httpx.get(target, headers={"If-Modified-Since": old}).status_code == 200
    # If-None-Match decides; If-Modified-Since is then ignored (RFC 9110 §13.2.2).
    r = httpx.get(target, headers={"If-None-Match": '"other"', "If-Modified-Since": modified})
    assert r.status_code == 200

    r = httpx.get(target, headers={"If-Match": '"other"'})
    assert r.status_code == 412 and r.json()["error"]["status"] == 412
    assert httpx.get(target, headers={"If-Match": etag}).status_code == 200
    assert httpx.get(target, headers={"If-Unmodified-Since": old}).status_code == 412
    assert httpx.get(target, headers={"If-Unmodified-Since": modified}).status_code == 200
    # 412 comes before 304.
    r = httpx.get(target, headers={"If-Match": '"other"', "If-None-Match": etag})
    assert r.status_code == 412


def test_if_range(server: Server, files_root: Path) -> None:
    target = url(server, "README.txt")
    data = (files_root / "README.txt").read_bytes()
    r = httpx.get(target)
    etag, modified = r.headers["etag"], r.headers["last-modified"]
    for validator in (etag, modified):
        r = httpx.get(target, headers={"Range": "bytes=5-9", "If-Range": validator})
        assert r.status_code == 206 and r.content == data[5:10]
    for stale in ('"other"', f"W/{etag}", "Mon, 01 Jan 2001 00:00:00 GMT"):
        r = httpx.get(target, headers={"Range": "bytes=5-9", "If-Range": stale})
        assert r.status_code == 200 and r.content == data


def test_single_ranges(server: Server, files_root: Path) -> None:
    target = url(server, LARGE_NAME)
    with (files_root / LARGE_NAME).open("rb") as f:
        head = f.read(1000)
        f.seek(LARGE_FILE_SIZE - 500)
        tail = f.read()
    cases = {"bytes=0-999": (head, f"bytes 0-999/{LARGE_FILE_SIZE}"),
             "bytes=100-199": (head[100:200], f"bytes 100-199/{LARGE_FILE_SIZE}"),
             f"bytes={LARGE_FILE_SIZE - 500}-": (tail, None),
             "bytes=-500": (tail, None)}
    for header, (expected, content_range) in cases.items():
        r = httpx.get(target, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == expected, header
        assert r.headers["content-length"] == str(len(expected))
        assert r.headers["content-range"] == (
            content_range or f"bytes {LARGE_FILE_SIZE - 500}-{LARGE_FILE_SIZE - 1}/"
            f"{LARGE_FILE_SIZE}")
    # HEAD ignores Range: it shows what a plain GET gets.
    assert httpx.head(target, headers={"Range": "bytes=0-9"}).status_code == 200


def test_ranges_of_a_file_out_of_the_page_cache(server: Server, files_root: Path) -> None:
    # Reads run on the event loop only for what the page cache holds (RWF_NOWAIT); the
    # rest is read in a thread. Either way, and mixed within one answer, the same bytes.
    path = files_root / LARGE_NAME
    first, last = 100 * MiB + 7, 103 * MiB
    with path.open("rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if read_cached(f.fileno(), first, MiB) is not None:
            pytest.skip("this file system keeps its pages in memory (tmpfs)")
        cold = os.pread(f.fileno(), last - first + 1, first)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        # A warm first half, a cold second half (past what readahead brings in).
        os.pread(f.fileno(), MiB, 10 * MiB)
        os.posix_fadvise(f.fileno(), 10 * MiB + MiB, 0, os.POSIX_FADV_DONTNEED)
        mixed = os.pread(f.fileno(), 4 * MiB, 10 * MiB)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    r = httpx.get(url(server, LARGE_NAME), headers={"Range": f"bytes={first}-{last}"})
    assert r.status_code == 206 and r.content == cold
    with path.open("rb") as f:
        os.pread(f.fileno(), MiB, 10 * MiB)
        os.posix_fadvise(f.fileno(), 10 * MiB + MiB, 0, os.POSIX_FADV_DONTNEED)
    r = httpx.get(url(server, LARGE_NAME),
                  headers={"Range": f"bytes={10 * MiB}-{14 * MiB - 1}"})
    assert r.status_code == 206 and r.content == mixed


def test_unsatisfiable_and_malformed_ranges(server: Server) -> None:
    target = url(server, "README.txt")
    size = int(httpx.head(target).headers["content-length"])
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        r = httpx.get(target, headers={"Range": header})
        assert r.status_code == 416, header
        assert r.headers["content-range"] == f"bytes */{size}"
        assert r.json()["error"]["status"] == 416
    for header in ("bytes=9-2", "lines=0-5", "bytes=a-b", "bytes", "bytes=0-1;2-3",
                   "bytes=99999999999999999999999999-", "\u00ff"):
        r = httpx.get(target, headers={"Range": header.encode("latin-1")})
        assert r.status_code in (200, 416), header
        if "9999" not in header:
            assert r.status_code == 200 and len(r.content) == size, header
    many = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 34, 2))  # 17 > 16
    r = httpx.get(target, headers={"Range": many})
    assert r.status_code == 200 and len(r.content) == size


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    boundary = content_type.split("boundary=")[1].encode()
    parts: list[tuple[str, bytes]] = []
    for piece in body.split(b"--" + boundary)[1:]:
        if piece.startswith(b"--"):
            break
        head, _, data = piece.partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        content_range = re.search(rb"Content-Range: (.*)", head)
        assert content_range is not None
        parts.append((content_range.group(1).decode().strip(), data[:-2]))
    return parts


@pytest.mark.needs("curl")
def test_curl_multipart_ranges(server: Server, files_root: Path, tmp_path: Path) -> None:
    data = (files_root / LARGE_NAME).open("rb").read(1000)
    out, headers = tmp_path / "body", tmp_path / "headers"
    subprocess.run(["curl", "-sSf", "-r", "0-99,200-299", "-D", str(headers), "-o", str(out),
                    url(server, LARGE_NAME)], check=True, timeout=30)
    head = headers.read_bytes().decode("latin-1")
    assert head.startswith("HTTP/1.1 206")
    content_type = re.search(r"(?i)content-type: ([^\r\n]*)", head)
    assert content_type and content_type.group(1).startswith("multipart/byteranges")
    length = re.search(r"(?i)content-length: (\d+)", head)
    body = out.read_bytes()
    assert length and int(length.group(1)) == len(body)
    parts = parse_multipart(body, content_type.group(1))
    assert parts == [(f"bytes 0-99/{LARGE_FILE_SIZE}", data[0:100]),
                     (f"bytes 200-299/{LARGE_FILE_SIZE}", data[200:300])]
    # Overlapping ranges are merged into one.
    r = httpx.get(url(server, LARGE_NAME), headers={"Range": "bytes=0-99,50-149,10-20"})
    assert r.status_code == 206 and r.content == data[:150]


def truncated_copy(source: Path, dest: Path, size: int) -> None:
    with source.open("rb") as f:
        dest.write_bytes(f.read(size))


@pytest.mark.needs("wget")
def test_wget_resumes(server: Server, files_root: Path, tmp_path: Path) -> None:
    truncated_copy(files_root / LARGE_NAME, tmp_path / LARGE_NAME, 100 * 1024 * 1024 + 7)
    subprocess.run(["wget", "-q", "-c", url(server, LARGE_NAME)], cwd=tmp_path, check=True,
                   timeout=60)
    assert sha256(tmp_path / LARGE_NAME) == sha256(files_root / LARGE_NAME)
    # Once complete, wget -c gets 416 and leaves the file alone.
    subprocess.run(["wget", "-q", "-c", url(server, LARGE_NAME)], cwd=tmp_path, check=True,
                   timeout=60)
    assert (tmp_path / LARGE_NAME).stat().st_size == LARGE_FILE_SIZE


@pytest.mark.needs("curl")
def test_curl_resumes(server: Server, files_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.bin"
    truncated_copy(files_root / LARGE_NAME, out, 50 * 1024 * 1024 - 3)
    subprocess.run(["curl", "-sSf", "-C", "-", "-o", str(out), url(server, LARGE_NAME)],
                   check=True, timeout=60)
    assert sha256(out) == sha256(files_root / LARGE_NAME)


@pytest.mark.needs("wget")
def test_wget_saves_the_non_ascii_name(server: Server, files_root: Path,
                                       tmp_path: Path) -> None:
    subprocess.run(["wget", "-q", "--content-disposition", url(server, UNICODE_NAME)],
                   cwd=tmp_path, check=True, timeout=30)
    assert [p.name for p in tmp_path.iterdir()] == [UNICODE_NAME]
    assert (tmp_path / UNICODE_NAME).read_bytes() == (files_root / UNICODE_NAME).read_bytes()


@pytest.mark.needs("curl")
def test_curl_oj_saves_the_name_it_understands(server: Server, files_root: Path,
                                               tmp_path: Path) -> None:
    # curl (7.88 here, and 8.x) reads only `filename=`, never `filename*`: it saves the
    # RFC 6266 ASCII fallback. Browsers and wget use the exact UTF-8 name.
    subprocess.run(["curl", "-sSf", "-OJ", url(server, UNICODE_NAME)], cwd=tmp_path,
                   check=True, timeout=30)
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1
    assert saved[0].name == UNICODE_NAME
    assert saved[0].read_bytes() == (files_root / UNICODE_NAME).read_bytes()


def test_listing(server: Server) -> None:
    r = httpx.get(server.url + "/files/")
    assert r.status_code == 200
    body = r.json()
    names = [e["name"] for e in body["entries"]]
    assert names == sorted(names)
    assert {"README.txt", "nested", "empty.bin", LARGE_NAME, UNICODE_NAME} <= set(names)
    # Hidden names, links out of the root, FIFOs, sockets and devices are not listed.
    for absent in (".hidden.txt", ".git", "outside-link.txt", "outside-dir", "etc-link",
                   "fifo", "sock", "null-device", "loop", "visible-link-to-hidden"):
        assert absent not in names
    assert "inside-link.txt" in names
    entry = next(e for e in body["entries"] if e["name"] == UNICODE_NAME)
    assert entry["kind"] == "file" and entry["url"] == url(server, UNICODE_NAME)
    assert httpx.get(entry["url"]).status_code == 200
    nested = next(e for e in body["entries"] if e["name"] == "nested")
    assert nested["kind"] == "dir" and nested["url"].endswith("/files/nested/")
    sub = httpx.get(nested["url"]).json()
    assert [e["name"] for e in sub["entries"]] == ["data.json", "deeper", "up-link.txt"]
    # Without the slash, a folder redirects to its listing.
    r = httpx.get(server.url + "/files/nested")
    assert r.status_code == 301 and r.headers["location"] == "/files/nested/"
    page = httpx.get(server.url + "/files/", params={"limit": 2, "offset": 1}).json()
    assert [e["name"] for e in page["entries"]] == names[1:3]
    assert page["total"] == body["total"] == len(names)
    for bad in ({"limit": "0"}, {"limit": "x"}, {"offset": "-1"}, {"limit": "100000"}):
        r = httpx.get(server.url + "/files/", params=bad)
        assert r.status_code == 400 and "error" in r.json()


def test_digest_learned_from_a_full_download(server: Server, files_root: Path,
                                             database_url: str) -> None:
    name = "digest-me.bin"
    data = os.urandom(3 * 1024 * 1024 + 11)
    (files_root / name).write_bytes(data)
    expected = "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"
    assert "repr-digest" not in httpx.head(url(server, name)).headers
    # A range does not read the whole file: still unknown.
    httpx.get(url(server, name), headers={"Range": "bytes=0-99"})
    assert "repr-digest" not in httpx.head(url(server, name)).headers
    assert httpx.get(url(server, name)).content == data
    assert wait_until(lambda: "repr-digest" in httpx.head(url(server, name)).headers, 5)
    assert httpx.head(url(server, name)).headers["repr-digest"] == expected
    r = httpx.get(url(server, name), headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.headers["repr-digest"] == expected
    listed = httpx.get(server.url + "/files/").json()["entries"]
    assert next(e for e in listed if e["name"] == name)["digest"] == expected
    rows = fetch(database_url, "SELECT size FROM exporter.file_digests WHERE path = $1", name)
    assert rows[0]["size"] == len(data)
    # Changed file: the stored digest is stale and never served.
    (files_root / name).write_bytes(data[::-1])
    assert "repr-digest" not in httpx.head(url(server, name)).headers


def test_digest_command(server: Server, files_root: Path, database_url: str) -> None:
    # In the session-wide root: removed afterwards, since other tests list `nested/`.
    extra = files_root / "nested" / "precomputed.txt"
    extra.write_bytes(b"known ahead of time\n")
    try:
        _check_digest_command(server, files_root, database_url)
    finally:
        extra.unlink()


def _check_digest_command(server: Server, files_root: Path, database_url: str) -> None:
    env = {**os.environ, "EXPORTER_DATABASE_URL": database_url,
           "EXPORTER_FILES_ROOT": str(files_root)}
    done = subprocess.run([*forked("exporter.cli"), "digest", "nested"],
                          cwd=ROOT, env=env, capture_output=True, timeout=60, check=True)
    assert b"files" in done.stderr and b"100.0%" in done.stderr
    expected = base64.b64encode(hashlib.sha256(b"known ahead of time\n").digest()).decode()
    r = httpx.head(url(server, "nested/precomputed.txt"))
    assert r.headers["repr-digest"] == f"sha-256=:{expected}:"
    again = subprocess.run([*forked("exporter.cli"), "digest", "nested"],
                           cwd=ROOT, env=env, capture_output=True, timeout=60, check=True)
    assert b"0 to compute" in again.stderr


def test_downloads_are_audited(server: Server, database_url: str) -> None:
    before = last_audit_id(database_url)
    r = httpx.get(url(server, "README.txt"), headers={"Range": "bytes=0-4"})
    assert r.status_code == 206
    # Filtered on what this test asked for: the rows of a download that an earlier test
    # just finished are written in the next batch, after `before` was read.
    audit = audited(database_url, "id > $1 AND target = 'README.txt' AND range = 'bytes=0-4'",
                    before)[0]
    assert (audit["target"], audit["range"], audit["bytes"], audit["status"],
            audit["http_status"], audit["client"]) == (
        "README.txt", "bytes=0-4", 5, "complete", 206, "127.0.0.1")
    assert audit["ended_at"] >= audit["started_at"]
