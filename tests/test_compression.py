"""Compression: content codings negotiated from Accept-Encoding (exports, compressible
files), the explicit `.gz` / `.zst` export URLs, and the `Digest` header aria2 verifies.

Units for `exporter.compression`; the negotiation matrix in process; real clients (curl,
wget, httpx, aria2c, gunzip, zstd, Chromium) against a real server.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import os
import re
import subprocess
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from exporter import compression
from exporter.compression import GZIP, ZSTD, Coding, coded_etag, compressed, negotiate
from exporter.config import Settings
from exporter.exports.filenames import query_tag
from tests.inprocess import InProcess
from tests.support import (
    Server,
    audited,
    fetch,
    last_audit_id,
    peak_rss_bytes,
    reset_peak_rss,
    rows_of,
    run_sql,
    wait_until,
)

TIMEOUT = 60
ORDERS = "/datasets/orders.csv"


def decode(coding: str | None, body: bytes) -> bytes:
    if coding is None:
        return body
    if coding == "gzip":
        return gzip.decompress(body)
    assert coding == "zstd"
    return zstandard.ZstdDecompressor().decompressobj().decompress(body)


# --- units: negotiate ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("gzip", GZIP),
        ("zstd", ZSTD),
        ("gzip, zstd", ZSTD),  # equal weights: the faster one
        ("gzip, deflate, br, zstd", ZSTD),  # Chromium's
        ("deflate, gzip, br, zstd", ZSTD),  # curl --compressed
        ("gzip;q=1, zstd;q=0.5", GZIP),
        ("GZIP;Q=0.8", GZIP),
        ("zstd;q=0, gzip;q=0.1", GZIP),
        ("*", ZSTD),
        ("*;q=0", None),
        ("*;q=0, gzip", GZIP),
        ("gzip;q=0, *", ZSTD),
        ("identity", None),
        ("identity;q=0", None),  # identity anyway: the same data, never a 406
        ("br, compress, x-gzip, foo", None),
        ("gzip;q=9999999999999999999999", None),  # beyond 1: not a q-value
        ("gzip;q=1e400", None),
        ("gzip;q=nan", None),
        ("gzip;q=-1", None),
        ("gzip;q=abc", None),
        ("gzip;q=", None),
        (";;;,,,;q=1", None),
        ("zstd;foo=bar;q=0.3, gzip;q=0.2", ZSTD),
        ("x" * 100_000 + ", gzip", None),  # past what is read of the header
        (",".join(["foo"] * 10_000) + ",gzip", None),
    ],
)
def test_negotiate(header: str | None, expected: Coding | None) -> None:
    assert negotiate(header) is expected


def test_coded_etag() -> None:
    assert coded_etag('"1f-2a-3"', GZIP) == '"1f-2a-3-gzip"'
    assert coded_etag('"1f-2a-3"', ZSTD) == '"1f-2a-3-zstd"'
    assert coded_etag('"1f-2a-3"', None) == '"1f-2a-3"'


@pytest.mark.parametrize(("kind", "expected"), [
    ("text/plain; charset=utf-8", True), ("text/csv", True), ("application/json", True),
    ("image/svg+xml", True), ("Application/JSON", True), ("image/png", False),
    ("application/gzip", False), ("application/octet-stream", False), ("video/mp4", False),
    ("textual/plain", False), ("", False),
])
def test_compressible(kind: str, expected: bool) -> None:
    assert compression.compressible(kind, Settings().compress_types) is expected


# --- units: compressed ---------------------------------------------------------------


async def _source(chunks: list[bytes], delay: float = 0.0,
                  closed: list[bool] | None = None) -> AsyncIterator[bytes]:
    try:
        for chunk in chunks:
            if delay:
                await asyncio.sleep(delay)
            yield chunk
    finally:
        if closed is not None:
            closed.append(True)


async def _collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in chunks]


@pytest.mark.parametrize("coding", [GZIP, ZSTD], ids=lambda c: c.name)
@pytest.mark.parametrize("data", [
    [],
    [b""],
    [b"a"],
    [os.urandom(100_000)],  # incompressible
    [b"id,name\n" + b"".join(b"%d,row %d\n" % (i, i) for i in range(50_000))],
    [bytes([i % 7]) * 65536 for i in range(20)],
], ids=["none", "empty", "one-byte", "random", "csv", "many-chunks"])
def test_compressed_round_trip(coding: Coding, data: list[bytes]) -> None:
    out = asyncio.run(_collect(compressed(_source(data), coding)))
    assert all(out), "no empty chunk is yielded"
    assert decode(coding.name, b"".join(out)) == b"".join(data)


# Several zstd jobs (JOB_SIZE each) and a tail, in an export's 64 KiB chunks.
_CSV = b"".join(b"%d,customer %d,%d.%02d,2026-01-01 00:00:%02d+00\n"
                % (i, i % 1000, i % 9973, i % 100, i % 60) for i in range(100_000))


@pytest.mark.parametrize("threads", [2, 4])
def test_zstd_in_several_threads_decodes_to_the_same_bytes(threads: int) -> None:
    """A body compressed by zstd's own threads (a parallel export's) is another zstd
    stream than one thread's, and decodes to the same bytes; gzip ignores `threads`."""
    data = [_CSV[at:at + 65536] for at in range(0, len(_CSV), 65536)]
    assert len(_CSV) > 3 * compression.JOB_SIZE

    def run(coding: Coding, n: int) -> bytes:
        out = asyncio.run(_collect(compressed(_source(data), coding, threads=n)))
        assert all(out), "no empty chunk is yielded"
        return b"".join(out)

    several = run(ZSTD, threads)
    assert decode("zstd", several) == _CSV
    # Not one thread's stream under another name: the threads were used (on one core
    # there is one, and so the same stream).
    assert (several != run(ZSTD, 1)) == ((os.cpu_count() or 1) > 1)
    assert run(GZIP, threads) == run(GZIP, 1)


@pytest.mark.parametrize("coding", [GZIP, ZSTD], ids=lambda c: c.name)
def test_compressed_flushes_a_trickling_body(coding: Coding,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk that comes after FLUSH_AFTER with nothing sent is flushed: what the client
    got so far decodes to every byte before it, before the body ends."""
    monkeypatch.setattr(compression, "FLUSH_AFTER", 0.05)
    rows = [b"%d,some text that compresses\n" % i for i in range(6)]

    async def run() -> list[bytes]:
        out = []
        async for piece in compressed(_source(rows, delay=0.1), coding):
            out.append(piece)
        return out

    out = asyncio.run(run())
    assert len(out) >= 3  # flushed pieces, then the trailer
    d: zlib._Decompress | zstandard.ZstdDecompressionObj
    d = zlib.decompressobj(31) if coding is GZIP else zstandard.ZstdDecompressor().decompressobj()
    so_far = d.decompress(b"".join(out[:-1]))
    # Everything but the last row (in flight when the source ended) is readable already.
    assert so_far.startswith(b"".join(rows[:-1])) and len(so_far) >= len(b"".join(rows[:4]))


@pytest.mark.parametrize(("coding", "threads"), [(GZIP, 1), (ZSTD, 1), (ZSTD, 2)],
                         ids=["gzip", "zstd", "zstd-threads"])
def test_compressed_sends_a_short_chunk_at_once(coding: Coding, threads: int) -> None:
    """A short chunk (a trickling export) is sent before the next one is asked for, also
    while zstd's threads hold a job open."""
    rows = b"1,first rows\n2,before a long pause\n"

    async def stalls() -> AsyncIterator[bytes]:
        yield rows
        await asyncio.sleep(3600)  # the query works on; never reached below
        yield b"late"

    async def first() -> bytes:
        gen = compressed(stalls(), coding, flush_below=65536, threads=threads)
        try:
            return await asyncio.wait_for(gen.__anext__(), 5)
        finally:
            await gen.aclose()

    d: zlib._Decompress | zstandard.ZstdDecompressionObj
    d = zlib.decompressobj(31) if coding is GZIP else zstandard.ZstdDecompressor().decompressobj()
    assert d.decompress(asyncio.run(first())) == rows


def test_compressed_closes_its_source_and_propagates_failures() -> None:
    closed: list[bool] = []

    async def take_one() -> None:
        gen = compressed(_source([b"x" * 100] * 10, closed=closed), GZIP)
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(take_one())
    assert closed == [True]

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise RuntimeError("backend gone")

    async def run() -> list[bytes]:
        return await _collect(compressed(failing(), ZSTD))

    with pytest.raises(RuntimeError, match="backend gone"):
        asyncio.run(run())


# --- in process: the negotiation matrix ----------------------------------------------


@pytest.fixture(scope="module")
def compress_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compress-files")
    lines = b"".join(b"%06d a line of text that compresses well\n" % i for i in range(2000))
    (root / "big.txt").write_bytes(lines)
    (root / "big.json").write_bytes(b'{"items": [' + b",".join(b"%d" % i for i in range(20000))
                                    + b"]}\n")
    (root / "small.txt").write_bytes(b"short\n")
    (root / "archive.csv.gz").write_bytes(gzip.compress(lines))
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + lines)
    (root / "data.bin").write_bytes(lines)
    return root


@pytest.fixture(scope="module")
def app(database_url: str, compress_root: Path) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, public_datasets=["*"], public_files=["*"],
                        files_root=compress_root)
    with InProcess(settings) as running:
        yield running


@pytest.fixture(scope="module")
def admin(app: InProcess) -> dict[str, str]:
    """For the audit trail's export (admins only)."""
    name = f"compress-{uuid.uuid4().hex[:8]}"
    secret = app.call(lambda st: st.tokens.create(name, ["admin"], None))
    return {"Authorization": f"Bearer {secret}"}


def _identity(app: InProcess, path: str, headers: dict[str, str] | None = None) -> bytes:
    r = app.get(path, headers={**(headers or {}), "Accept-Encoding": "identity"})
    assert r.status_code == 200 and "content-encoding" not in r.headers
    return r.content


@pytest.mark.parametrize(("accept_encoding", "coding"), [
    (None, None), ("identity", None), ("gzip", "gzip"), ("zstd", "zstd"),
    ("gzip, deflate, br, zstd", "zstd"), ("gzip;q=1, zstd;q=0.1", "gzip"), ("*;q=0", None),
    ("identity;q=0", None), ("br, compress", None), ("gzip;q=99999999999999999999", None),
    ("*", "zstd"),
])
@pytest.mark.parametrize("path", [ORDERS + "?limit=500", "/datasets/orders.ndjson?limit=500",
                                  "/datasets/orders?limit=500", "/downloads.csv?limit=5",
                                  "/datasets/orders.tsv?limit=500"])
def test_exports_negotiate_their_coding(app: InProcess, admin: dict[str, str], path: str,
                                        accept_encoding: str | None,
                                        coding: str | None) -> None:
    # httpx sends its own Accept-Encoding unless told: an empty one stands for none at all.
    headers = {**admin, "Accept-Encoding": accept_encoding or ""}
    r = app.get(path, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers.get("content-encoding") == coding
    assert r.headers["vary"] == "Accept, Accept-Encoding"
    assert "content-length" not in r.headers
    if not path.startswith("/downloads"):  # the audit trail grows with every request
        assert r.content == _identity(app, path)  # httpx decoded it
    head = app.head(path, headers=headers)
    assert head.status_code == 200
    for name in ("content-type", "content-encoding", "vary", "accept-ranges",
                 "cache-control"):
        assert head.headers.get(name) == r.headers.get(name), name
    assert "content-length" not in head.headers


def test_a_range_request_gets_an_identity_export(app: InProcess) -> None:
    r = app.get(ORDERS + "?limit=50", headers={"Accept-Encoding": "gzip, zstd",
                                              "Range": "bytes=0-"})
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert r.headers["vary"] == "Accept, Accept-Encoding"


def test_compression_off(database_url: str) -> None:
    settings = Settings(database_url=database_url, public_datasets=["*"], compression=False)
    with InProcess(settings) as off:
        r = off.get(ORDERS + "?limit=10", headers={"Accept-Encoding": "gzip, zstd"})
        assert r.status_code == 200 and "content-encoding" not in r.headers
        # The explicit URLs are files in a format: they still work.
        gz = off.get(ORDERS + ".gz?limit=10", headers={"Accept-Encoding": ""})
        assert gz.status_code == 200 and gz.headers["content-type"] == "application/gzip"
        assert gzip.decompress(gz.content) == r.content


@pytest.mark.parametrize(("suffix", "media_type", "coding"), [
    (".csv.gz", "application/gzip", "gzip"), (".ndjson.gz", "application/gzip", "gzip"),
    (".csv.zst", "application/zstd", "zstd"), (".ndjson.zst", "application/zstd", "zstd"),
])
@pytest.mark.parametrize("accept_encoding", ["", "gzip, zstd"])
def test_explicit_urls_are_files_in_that_coding(app: InProcess, suffix: str, media_type: str,
                                                coding: str, accept_encoding: str) -> None:
    path = f"/datasets/orders{suffix}?limit=300"
    r = app.get(path, headers={"Accept-Encoding": accept_encoding})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media_type
    assert "content-encoding" not in r.headers  # the body is the file, not a coding of it
    assert re.fullmatch(rf'attachment; filename="orders-\d{{8}}T\d{{6}}Z-{query_tag("limit=300")}'
                        rf'{re.escape(suffix)}"',
                        r.headers["content-disposition"]), r.headers["content-disposition"]
    plain = path.replace(suffix, suffix.rsplit(".", 1)[0])
    assert decode(coding, r.content) == _identity(app, plain)
    head = app.head(path)
    assert head.status_code == 200
    assert head.headers["content-type"] == media_type
    assert "content-encoding" not in head.headers
    assert head.headers["content-disposition"].endswith(f'{suffix}"')


def test_the_audit_trail_as_a_gzip_file(app: InProcess, admin: dict[str, str]) -> None:
    r = app.get("/downloads.csv.gz?limit=3", headers={**admin, "Accept-Encoding": ""})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert gzip.decompress(r.content).startswith(b"id,")
    assert app.get("/downloads.gz", headers=admin).status_code == 404
    assert app.get("/downloads.csv.br", headers=admin).status_code == 404


def test_odd_names_and_suffixes(app: InProcess, database_url: str) -> None:
    run_sql(database_url,
            'CREATE TABLE IF NOT EXISTS exports."x.csv" (n int)',
            'TRUNCATE exports."x.csv"', 'INSERT INTO exports."x.csv" VALUES (1), (2)',
            'CREATE TABLE IF NOT EXISTS exports."plain.gz" (n int)',
            'TRUNCATE exports."plain.gz"', 'INSERT INTO exports."plain.gz" VALUES (7)')
    # `x.csv` in a format, in a coding: the format comes before the coding.
    r = app.get("/datasets/x.csv.csv.gz", headers={"Accept-Encoding": ""})
    assert r.status_code == 200, r.text
    assert gzip.decompress(r.content) == b"n\n1\n2\n"
    assert 'filename="x.csv-' in r.headers["content-disposition"]
    # `orders.gz`: no format named, so a dataset's own name; there is none: 404 with a hint.
    r = app.get("/datasets/orders.gz")
    assert r.status_code == 404
    assert "orders.csv.gz" in r.json()["error"]["message"]
    r = app.get("/datasets/x.csv.gz")
    assert r.status_code == 404
    # A dataset named `plain.gz` is itself, by Accept (and negotiated like any export).
    r = app.get("/datasets/plain.gz", headers={"Accept-Encoding": "gzip", "Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.content == b"n\n7\n"
    assert app.get("/datasets/plain.gz.csv.zst").status_code == 200
    for path in ["/datasets/orders.csv.gz.gz", "/datasets/orders.zst.csv",
                 "/datasets/.gz", "/datasets/.csv.gz", "/datasets/orders.csv.GZ.x"]:
        assert app.get(path).status_code == 404, path
    # Upper case, as the formats' own suffixes: the same as lower case, or a 404, never a 500.
    assert app.get("/datasets/orders.csv.GZ?limit=1").status_code in (200, 404)


def test_the_listing_names_the_compressed_urls(app: InProcess) -> None:
    orders = {d["name"]: d for d in app.get("/datasets").json()["datasets"]}["orders"]
    assert orders["compressed_exports"] == {
        f"{fmt}.{ext}": f"{app.url}/datasets/orders.{fmt}.{ext}"
        for fmt in ("csv", "json", "ndjson", "tsv", "arrow") for ext in ("zst", "gz")
    }  # not Parquet or XLSX (a ZIP): compressed inside


# --- in process: files ---------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
@pytest.mark.parametrize("name", ["big.txt", "big.json"])
def test_compressible_files_are_compressed(app: InProcess, compress_root: Path, name: str,
                                           coding: str) -> None:
    plain = app.get(f"/files/{name}", headers={"Accept-Encoding": ""})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    assert plain.headers["vary"] == "Accept-Encoding"
    assert plain.headers["content-length"] == str((compress_root / name).stat().st_size)
    etag = plain.headers["etag"]

    r = app.get(f"/files/{name}", headers={"Accept-Encoding": coding})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == coding
    assert "content-length" not in r.headers
    assert r.headers["vary"] == "Accept-Encoding"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"] == etag[:-1] + f'-{coding}"'
    assert "repr-digest" not in r.headers and "digest" not in r.headers
    assert r.content == (compress_root / name).read_bytes()
    head = app.head(f"/files/{name}", headers={"Accept-Encoding": coding})
    assert head.status_code == 200
    assert {k: v for k, v in head.headers.items() if k != "date"} == {
        k: v for k, v in r.headers.items() if k not in ("date", "transfer-encoding")}

    # Conditional requests hold against either tag; a 304 names the one it would send.
    for tag in (etag, r.headers["etag"], f'W/{r.headers["etag"]}'):
        again = app.get(f"/files/{name}", headers={"Accept-Encoding": coding,
                                                   "If-None-Match": tag})
        assert again.status_code == 304, tag
        assert again.headers["etag"] == r.headers["etag"]
        assert again.headers["vary"] == "Accept-Encoding"
        assert app.get(f"/files/{name}", headers={"Accept-Encoding": "", "If-None-Match": tag}
                       ).headers["etag"] == etag
    matched = app.get(f"/files/{name}", headers={"Accept-Encoding": coding,
                                                 "If-Match": r.headers["etag"]})
    assert matched.status_code == 200
    assert app.get(f"/files/{name}", headers={"Accept-Encoding": coding,
                                              "If-Match": '"other"'}).status_code == 412


def test_a_range_of_a_compressible_file_is_identity(app: InProcess, compress_root: Path) -> None:
    data = (compress_root / "big.txt").read_bytes()
    r = app.get("/files/big.txt", headers={"Accept-Encoding": "gzip, zstd",
                                          "Range": "bytes=100-199"})
    assert r.status_code == 206
    assert "content-encoding" not in r.headers
    assert r.content == data[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(data)}"
    plain_etag = app.head("/files/big.txt", headers={"Accept-Encoding": ""}).headers["etag"]
    assert r.headers["etag"] == plain_etag
    # If-Range with the gzip tag names another representation: the whole file, in identity.
    whole = app.get("/files/big.txt", headers={
        "Accept-Encoding": "gzip", "Range": "bytes=100-199",
        "If-Range": plain_etag[:-1] + '-gzip"'})
    assert whole.status_code == 200 and "content-encoding" not in whole.headers
    assert whole.content == data


@pytest.mark.parametrize("name", ["small.txt", "archive.csv.gz", "picture.png", "data.bin"])
def test_files_not_worth_compressing_are_sent_as_they_are(app: InProcess,
                                                          compress_root: Path,
                                                          name: str) -> None:
    r = app.get(f"/files/{name}", headers={"Accept-Encoding": "gzip, zstd"})
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert "vary" not in r.headers
    assert r.content == (compress_root / name).read_bytes()
    assert r.headers["content-length"] == str(len(r.content))


def test_files_with_compression_off(database_url: str, compress_root: Path) -> None:
    settings = Settings(database_url=database_url, public_files=["*"], files_root=compress_root,
                        compression=False)
    with InProcess(settings) as off:
        r = off.get("/files/big.txt", headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200 and "content-encoding" not in r.headers
        assert "vary" not in r.headers


def test_compressed_file_downloads_are_audited_and_hashed(app: InProcess,
                                                          database_url: str,
                                                          compress_root: Path) -> None:
    name = f"hashed-{uuid.uuid4().hex[:8]}.txt"
    data = b"".join(b"%d hashed line\n" % i for i in range(5000))
    (compress_root / name).write_bytes(data)
    r = app.get(f"/files/{name}", headers={"Accept-Encoding": "zstd"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "zstd"
    row, = audited(database_url, "target = $1", name)
    assert row["status"] == "complete"
    assert 0 < row["bytes"] < len(data)  # what was sent: the compressed bytes
    # The whole file went through the hash on the way: its digest is known now.
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert wait_until(lambda: app.head(f"/files/{name}", headers={"Accept-Encoding": ""})
                      .headers.get("digest") == f"SHA-256={digest}", 10)
    head = app.head(f"/files/{name}", headers={"Accept-Encoding": ""})
    assert head.headers["repr-digest"] == f"sha-256=:{digest}:"


# --- real clients ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_views(database_url: str) -> None:
    run_sql(
        database_url,
        "CREATE OR REPLACE VIEW exports.endless_compressed AS"
        # (generate_series in the select list streams; in FROM it is materialised first.)
        " SELECT g AS id, md5(g::text) AS hash"
        " FROM (SELECT generate_series(1, 1000000000) AS g) AS s",
        "CREATE OR REPLACE VIEW exports.compress_two_million AS"
        " SELECT g AS id, md5(g::text) AS hash, g * 1.25 AS amount,"
        " timestamptz '2026-01-01' + g * interval '1 second' AS at, repeat('y', 60) AS pad"
        " FROM (SELECT generate_series(1, 2000000) AS g) AS s",
    )


def _identity_export(server: Server, path: str) -> bytes:
    r = httpx.get(server.url + path, headers={"Accept-Encoding": "identity"}, timeout=TIMEOUT)
    assert r.status_code == 200 and "content-encoding" not in r.headers
    return r.content


@pytest.mark.needs("curl")
@pytest.mark.parametrize("path", [ORDERS, "/datasets/orders.ndjson"])
def test_curl_compressed_equals_identity(server: Server, tmp_path: Path, path: str) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--compressed", "-D", "headers", "-o", "body", "-w", "%{size_download}",
         server.url + path], cwd=tmp_path, capture_output=True, timeout=TIMEOUT, check=True)
    headers = (tmp_path / "headers").read_text().lower()
    assert re.search(r"^content-encoding: (gzip|zstd)\r?$", headers, re.M), headers
    identity = _identity_export(server, path)
    assert (tmp_path / "body").read_bytes() == identity
    assert int(out.stdout) * 3 < len(identity)  # what crossed the wire


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_httpx_decodes_both_codings(server: Server, coding: str) -> None:
    with httpx.stream("GET", server.url + ORDERS, headers={"Accept-Encoding": coding},
                      timeout=TIMEOUT) as r:
        assert r.headers["content-encoding"] == coding
        raw = b"".join(r.iter_raw())
    assert decode(coding, raw) == _identity_export(server, ORDERS)
    r = httpx.get(server.url + ORDERS, headers={"Accept-Encoding": coding}, timeout=TIMEOUT)
    assert r.content == _identity_export(server, ORDERS)


@pytest.mark.needs("wget", "curl")
@pytest.mark.parametrize(("suffix", "command"), [
    (".csv.gz", ["gunzip", "-c"]), (".ndjson.gz", ["gunzip", "-c"]),
    pytest.param(".csv.zst", ["zstd", "-dc"], marks=pytest.mark.needs("zstd")),
    pytest.param(".ndjson.zst", ["zstd", "-dc"], marks=pytest.mark.needs("zstd")),
])
def test_explicit_urls_saved_by_wget_and_curl(server: Server, tmp_path: Path, suffix: str,
                                              command: list[str]) -> None:
    plain = "/datasets/orders." + suffix.split(".")[1]
    identity = _identity_export(server, plain)
    for tool, argv in [
        ("wget", ["wget", "-q", "--content-disposition", server.url + plain + "." +
                  suffix.rsplit(".", 1)[1]]),
        ("curl", ["curl", "-sSfOJ", server.url + plain + "." + suffix.rsplit(".", 1)[1]]),
    ]:
        folder = tmp_path / tool
        folder.mkdir()
        subprocess.run(argv, cwd=folder, check=True, timeout=TIMEOUT)
        saved, = folder.iterdir()
        assert re.fullmatch(rf"orders-\d{{8}}T\d{{6}}Z{re.escape(suffix)}", saved.name), saved
        decoded = subprocess.run([*command, saved.name], cwd=folder, check=True,
                                 capture_output=True, timeout=TIMEOUT).stdout
        assert decoded == identity, tool


@pytest.mark.needs("curl")
def test_a_compressed_export_cut_by_the_database_fails_in_curl(
        server: Server, database_url: str, slow_views: None, tmp_path: Path) -> None:
    process = subprocess.Popen(
        ["curl", "-sS", "--compressed", "--limit-rate", "1M", "-o", "out.csv",
         server.url + "/datasets/endless_compressed.csv"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: (tmp_path / "out.csv").exists()
                          and (tmp_path / "out.csv").stat().st_size > 1_000_000, 20)
        query = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'exporter'"
                 " AND query LIKE 'COPY%endless_compressed%' AND state <> 'idle'")
        pids = [r["pid"] for r in fetch(database_url, query)]
        assert len(pids) == 1
        run_sql(database_url, f"SELECT pg_terminate_backend({pids[0]})")
        # A chunked body without its final chunk and a gzip/zstd stream without its end:
        # curl reports a partial transfer (18), never success.
        code = process.wait(90)
        assert code != 0
        assert code in (18, 23, 56, 61), code
    finally:
        process.kill()
        process.wait()
    row = audited(database_url, "id = (SELECT max(id) FROM exporter.downloads"
                  " WHERE target = 'endless_compressed')")[-1]
    assert row["status"] == "failed"


def test_hostile_accept_encodings(server: Server) -> None:
    url = server.url + ORDERS + "?limit=5"
    cases = [
        "gzip;q=" + "9" * 5000,
        "gzip;q=0." + "9" * 5000,
        "*;q=0",
        "identity;q=0",
        "identity;q=0, *;q=0",
        "br, compress, x-unknown, deflate",
        "gzip" * 10_000,
        ",".join(["gzip;q=0"] * 5000) + ",zstd",
        "x" * 60_000,
    ]
    for value in cases:
        r = httpx.get(url, headers={"Accept-Encoding": value}, timeout=TIMEOUT)
        assert r.status_code == 200, (value[:40], r.status_code)
        assert r.text.startswith("id,")
    # Larger than the server takes for a whole request head: 431, not a 500.
    r = httpx.get(url, headers={"Accept-Encoding": "gzip, " + "x" * 100_000}, timeout=TIMEOUT)
    assert r.status_code == 431
    assert httpx.get(url, timeout=TIMEOUT).status_code == 200


def test_compressed_export_memory_stays_flat(memory_server: Server,
                                             slow_views: None) -> None:
    s = memory_server
    reset_peak_rss(s.pid)
    path = s.url + "/datasets/compress_two_million.csv"
    for coding in ("zstd", "gzip"):
        assert httpx.get(path + "?limit=10", headers={"Accept-Encoding": coding}
                         ).status_code == 200
    baseline = peak_rss_bytes(s.pid)
    for coding in ("zstd", "gzip"):
        raw = 0
        d = zlib.decompressobj(31) if coding == "gzip" else \
            zstandard.ZstdDecompressor().decompressobj()
        plain = 0
        with httpx.stream("GET", path, headers={"Accept-Encoding": coding},
                          timeout=120) as r:
            assert r.headers["content-encoding"] == coding
            for chunk in r.iter_raw():
                raw += len(chunk)
                plain += len(d.decompress(chunk))
        assert plain > 200_000_000 and raw * 3 < plain
    growth = peak_rss_bytes(s.pid) - baseline
    print(f"peak grew by {growth / 2**20:.1f} MiB")
    assert growth < 40 * 2**20, f"grew by {growth / 2**20:.1f} MiB"


# --- Digest, for aria2 -------------------------------------------------------------------


@pytest.fixture
def digest_root(tmp_path: Path) -> Path:
    root = tmp_path / "files"
    root.mkdir()
    return root


@pytest.mark.needs("aria2c")
def test_aria2_checks_the_digest_header(make_server: type[Server], digest_root: Path,
                                        tmp_path: Path, database_url: str) -> None:
    good = f"good-{uuid.uuid4().hex[:8]}.bin"
    bad = f"bad-{uuid.uuid4().hex[:8]}.bin"
    data = os.urandom(6 * 2**20)
    (digest_root / good).write_bytes(data)
    (digest_root / bad).write_bytes(data)
    st = (digest_root / bad).stat()
    # A digest that does not match the bytes, for this very file (size, mtime, inode):
    # aria2 must refuse the download.
    run_sql(database_url,
            "INSERT INTO exporter.file_digests (path, size, mtime_ns, inode, sha256)"
            f" VALUES ('{bad}', {st.st_size}, {st.st_mtime_ns}, {st.st_ino},"
            f" sha256('wrong'::bytea))")
    with make_server({"EXPORTER_FILES_ROOT": str(digest_root)}) as s:
        # The first whole download computes the digest on the way.
        assert httpx.get(f"{s.url}/files/{good}", timeout=TIMEOUT).content == data
        expected = "SHA-256=" + base64.b64encode(hashlib.sha256(data).digest()).decode()
        assert wait_until(lambda: httpx.head(f"{s.url}/files/{good}").headers.get("digest")
                          == expected, 10)
        head = httpx.head(f"{s.url}/files/{good}")
        assert head.headers["repr-digest"] == "sha-256=:" + expected.split("=", 1)[1] + ":"

        out = tmp_path / "aria2"
        out.mkdir()
        aria = ["aria2c", "-q", "-x", "4", "-s", "4", "-k", "1M", "--allow-overwrite=true",
                "--auto-file-renaming=false", "-d", str(out)]
        ok = subprocess.run([*aria, f"{s.url}/files/{good}"], capture_output=True,
                            timeout=TIMEOUT)
        assert ok.returncode == 0, ok.stderr
        assert (out / good).read_bytes() == data
        refused = subprocess.run([*aria, f"{s.url}/files/{bad}"], capture_output=True,
                                 timeout=TIMEOUT)
        # 32: checksum validation failed.
        assert refused.returncode == 32, (refused.returncode, refused.stdout, refused.stderr)


# --- Chromium ------------------------------------------------------------------------------


@pytest.mark.needs("chromium")
def test_chromium_link_and_fetch_decode_to_identity(server: Server, database_url: str) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_browser import ARGS, CHROMIUM

    identity = _identity_export(server, ORDERS)
    before = last_audit_id(database_url, server.url)  # the identity export's row written
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        try:
            context = browser.new_context(accept_downloads=True)
            context.set_default_timeout(30_000)
            page = context.new_page()
            page.goto(server.url + "/")
            # fetch() in the page: Chromium asks for zstd and gzip, and decodes.
            seen = page.evaluate("""async (url) => {
                const r = await fetch(url, {cache: "no-store"});
                const bytes = new Uint8Array(await r.arrayBuffer());
                let s = "";
                for (let i = 0; i < bytes.length; i += 8192)
                    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
                return {status: r.status, body: btoa(s)};
            }""", ORDERS)
            assert seen["status"] == 200
            assert base64.b64decode(seen["body"]) == identity
            # A link, as a person clicks it: the saved file is the identity export.
            page.evaluate("""(url) => {
                const a = document.createElement("a");
                a.href = url; a.id = "compressed-link"; a.textContent = "orders";
                document.body.append(a);
            }""", ORDERS)
            with page.expect_download() as info:
                page.click("#compressed-link")
            download = info.value
            assert re.fullmatch(r"orders-\d{8}T\d{6}Z\.csv", download.suggested_filename)
            assert Path(download.path()).read_bytes() == identity
            # And the explicit URL is saved as the .gz file it is.
            page.evaluate("""(url) => { document.getElementById("compressed-link").href = url; }""",
                          ORDERS + ".gz")
            with page.expect_download() as info:
                page.click("#compressed-link")
            assert info.value.suggested_filename.endswith(".csv.gz")
            assert gzip.decompress(Path(info.value.path()).read_bytes()) == identity
            context.close()
        finally:
            browser.close()
    # What crossed the wire, as the audit counts it: every one of the three compressed.
    rows = audited(database_url, "id > $1 AND target = 'orders' AND instance LIKE $2",
                   before, rows_of(server), count=3)
    assert len(rows) == 3 and all(0 < r["bytes"] * 2 < len(identity) for r in rows), rows
