"""Files served from object storage (EXPORTER_FILES_ROOT=s3://bucket/prefix) against a real
S3 server (SeaweedFS, tests/s3.py): what a file download does from a folder, from the
store: Range and multi-range, conditions and ETags, digests, listings, path rules, the
audit, pre-signed redirects; curl and wget (resumed with -c) through a real server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import obstore
import pytest
from obstore.store import S3Store

from exporter.config import Settings
from exporter.objects import StoreUrl
from tests.inprocess import InProcess
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY, Seaweed
from tests.support import Server, audited, exporter_cli, wait_until
from tests.test_access import new_token
from tests.test_corpus import ENTRIES, HTML, SVG, send

ONE = os.urandom(300 * 1024)
LARGE = os.urandom(6 * 1024 * 1024 + 17)  # a multipart object (its ETag ends in -2)
OBJECTS = {
    "README.txt": b"Files from the store.\n",
    "data/one.bin": ONE,
    "data/sub/two.txt": b"two\n",
    "data/.hidden.txt": b"SECRET",
    ".secret": b"SECRET",
    "we ird n\u00e4me %41.txt": b"weird\n",
    "large.bin": LARGE,
    "page.html": HTML, "image.svg": SVG,
    "notes.txt": b"compressible text, " * 200,
}


def raw_store(s3: Seaweed, prefix: str = "") -> S3Store:
    """The bucket as any S3 client sees it: no key checks (what others may have put)."""
    return S3Store(s3.bucket, prefix=prefix or None, endpoint=s3.endpoint,
                   access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, region=REGION,
                   allow_http=True, virtual_hosted_style_request=False)


@pytest.fixture(scope="module")
def files_url(s3: Seaweed) -> str:
    url = s3.url(f"files-{os.urandom(4).hex()}")
    prefix = StoreUrl.parse(url).prefix
    store = raw_store(s3, prefix)
    for key, data in OBJECTS.items():
        obstore.put(store, key, data)
    # Keys no request may name, beside and around the prefix. (A key with a backslash
    # cannot be made here: SeaweedFS takes it for a separator.)
    obstore.put(raw_store(s3, prefix + "-other"), "secret.txt", b"SECRET")
    obstore.put(raw_store(s3), "top-secret.txt", b"SECRET")
    return url


@pytest.fixture(scope="module")
def s3_env(s3: Seaweed) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3.env.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def app(database_url: str, files_url: str, s3_env: None) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, files_root=files_url, public_datasets=[],
                        public_files=["*"], s3_allow_http=True)
    with InProcess(settings) as running:
        yield running


def sha256_header(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def test_whole_file_validators_digest_and_audit(app: InProcess, database_url: str) -> None:
    first = app.get("/files/data/one.bin")
    assert first.status_code == 200 and first.content == ONE
    etag = first.headers["etag"]
    assert etag == obstore.head(raw_store_of(app), "data/one.bin")["e_tag"]
    assert first.headers["content-length"] == str(len(ONE))
    assert first.headers["accept-ranges"] == "bytes"
    assert first.headers["last-modified"].endswith(" GMT")
    assert first.headers["content-security-policy"] == "sandbox; default-src 'none'"
    assert "attachment" in first.headers["content-disposition"]
    # The whole answer computed the digest: the next one sends it.
    assert wait_until(lambda: "repr-digest" in app.get("/files/data/one.bin").headers, 20)
    again = app.get("/files/data/one.bin")
    assert again.headers["repr-digest"] == sha256_header(ONE)
    assert again.headers["digest"].startswith("SHA-256=")
    rows = audited(database_url, "target = $1 AND kind = 'file'", "data/one.bin", count=2)
    assert rows[0]["status"] == "complete" and rows[0]["bytes"] == len(ONE)
    multipart = app.get("/files/large.bin")
    assert multipart.content == LARGE and multipart.headers["etag"].endswith('-2"')


def raw_store_of(app: InProcess) -> S3Store:
    store = app.state.files_store
    assert store is not None
    return store._store


def test_ranges(app: InProcess) -> None:
    etag = app.head("/files/data/one.bin").headers["etag"]
    one = app.get("/files/data/one.bin", headers={"Range": "bytes=10-19"})
    assert one.status_code == 206 and one.content == ONE[10:20]
    assert one.headers["content-range"] == f"bytes 10-19/{len(ONE)}"
    suffix = app.get("/files/data/one.bin", headers={"Range": "bytes=-5"})
    assert suffix.status_code == 206 and suffix.content == ONE[-5:]
    many = app.get("/files/data/one.bin", headers={"Range": "bytes=0-4,100000-100009"})
    assert many.status_code == 206
    assert many.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert ONE[0:5] in many.content and ONE[100000:100010] in many.content
    assert f"Content-Range: bytes 100000-100009/{len(ONE)}".encode() in many.content
    # Across the parts of a multipart object.
    across = app.get("/files/large.bin", headers={"Range": "bytes=5242870-5242889"})
    assert across.content == LARGE[5242870:5242890]
    beyond = app.get("/files/data/one.bin", headers={"Range": f"bytes={len(ONE)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(ONE)}"
    same = app.get("/files/data/one.bin", headers={"Range": "bytes=1-2", "If-Range": etag})
    assert same.status_code == 206 and same.content == ONE[1:3]
    other = app.get("/files/data/one.bin", headers={"Range": "bytes=1-2",
                                                    "If-Range": '"another"'})
    assert other.status_code == 200 and other.content == ONE


def test_conditions_and_head(app: InProcess) -> None:
    head = app.head("/files/data/one.bin")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(ONE))
    etag, modified = head.headers["etag"], head.headers["last-modified"]
    assert app.get("/files/data/one.bin", headers={"If-None-Match": etag}).status_code == 304
    assert app.get("/files/data/one.bin",
                   headers={"If-Modified-Since": modified}).status_code == 304
    assert app.get("/files/data/one.bin", headers={"If-Match": '"x"'}).status_code == 412
    assert app.get("/files/data/one.bin", headers={"If-Match": etag}).status_code == 200


def test_listings(app: InProcess) -> None:
    top = app.get("/files/")
    assert top.status_code == 200
    # scratch/: what other tests of the module put there meanwhile.
    entries = {e["name"]: e for e in top.json()["entries"] if e["name"] != "scratch"}
    assert set(entries) == {"README.txt", "data", "large.bin", "we ird n\u00e4me %41.txt",
                            "page.html", "image.svg", "notes.txt"}
    assert entries["data"]["kind"] == "dir" and entries["data"]["mtime"] is None
    assert entries["README.txt"]["size"] == len(OBJECTS["README.txt"])
    assert entries["README.txt"]["url"].endswith("/files/README.txt")
    weird = app.get(entries["we ird n\u00e4me %41.txt"]["url"].removeprefix(app.url))
    assert weird.content == b"weird\n"
    assert app.get("/files/data").status_code == 301
    assert app.get("/files/data").headers["location"] == "/files/data/"
    data = app.get("/files/data/").json()
    assert [(e["name"], e["kind"]) for e in data["entries"]] == [("one.bin", "file"),
                                                                  ("sub", "dir")]
    paged = app.get("/files/data/?limit=1&offset=1").json()
    assert paged["total"] == 2 and [e["name"] for e in paged["entries"]] == ["sub"]
    assert app.get("/files/nothing/").status_code == 404
    assert app.get("/files/data/one.bin/").status_code == 404
    page = app.get("/?path=data/")
    assert page.status_code == 200 and "one.bin" in page.text


def test_listings_and_the_page_ask_the_store_once_per_period(
        app: InProcess, database_url: str, files_url: str, s3: Seaweed, s3_env: None) -> None:
    """Folder listings and the page within EXPORTER_S3_LIST_CACHE cost one LIST; what
    another client adds shows once it has passed."""
    folder = f"scratch/kept-{os.urandom(4).hex()}"
    raw = raw_store(s3, StoreUrl.parse(files_url).prefix)
    obstore.put(raw, f"{folder}/a.txt", b"a")
    settings = Settings(database_url=database_url, files_root=files_url, public_datasets=[],
                        public_files=["*"], s3_allow_http=True, s3_list_cache=60)

    def names(running: InProcess) -> list[str]:
        answer = running.get(f"/files/{folder}/")
        assert answer.status_code == 200, answer.text
        return [e["name"] for e in answer.json()["entries"]]

    with InProcess(settings) as kept:
        store = kept.state.files_store
        assert store is not None
        assert names(kept) == ["a.txt"]
        lists = store.lists
        assert names(kept) == ["a.txt"]
        page = kept.get(f"/?path={folder}/")
        assert page.status_code == 200 and "a.txt" in page.text
        assert store.lists == lists  # the second listing and the page: no LIST
        obstore.put(raw, f"{folder}/b.txt", b"b")
        assert names(kept) == ["a.txt"]  # within the period
    # The module's server keeps them the default 3 s (the listing above, kept for the
    # process, included).
    assert wait_until(lambda: names(app) == ["a.txt", "b.txt"], 20)


@pytest.mark.parametrize("path", [
    ".secret", "data/.hidden.txt", "back%5Cslash.txt", "..%2Ftop-secret.txt",
    "%2E%2E/top-secret.txt", "../top-secret.txt", "data/../../top-secret.txt",
    quote("../" + "x-other/secret.txt"), "%2Fetc%2Fpasswd", "data//one.bin", "nothing.txt",
    "data/%00", "data%0A",
])
def test_paths_that_cannot_reach_outside_or_hidden(app: InProcess, path: str) -> None:
    answer = app.get("/files/" + path)
    assert answer.status_code in (400, 404), (path, answer.status_code)
    assert b"SECRET" not in answer.content


def test_presigned_redirect(database_url: str, files_url: str, s3_env: None) -> None:
    settings = Settings(database_url=database_url, files_root=files_url, public_datasets=[],
                        public_files=["data/"], s3_allow_http=True,
                        files_redirect="presigned", files_redirect_expiry=60)
    with InProcess(settings) as app:
        answer = app.get("/files/data/one.bin")
        assert answer.status_code == 302
        assert answer.headers["cache-control"] == "no-store"
        location = answer.headers["location"]
        assert "X-Amz-Signature=" in location and "X-Amz-Expires=60" in location
        fetched = httpx.get(location)
        assert fetched.status_code == 200 and fetched.content == ONE
        ranged = httpx.get(location, headers={"Range": "bytes=3-9"})
        assert ranged.status_code == 206 and ranged.content == ONE[3:10]
        # The same checks as a download: a file the principal may not read gets none.
        assert app.get("/files/README.txt").status_code == 401
        assert app.get("/files/data/.hidden.txt").status_code == 404
        rows = audited(database_url, "target = $1 AND status = 'proxied'", "data/one.bin")
        assert rows[-1]["kind"] == "file"


def test_presigned_downloads_carry_the_name_and_type(database_url: str, files_url: str,
                                                    s3_env: None) -> None:
    """The store's answer to the pre-signed URL says what this server would: its name
    (curl -OJ saves it so), its type, attachment unless inline was asked and allowed."""
    settings = Settings(database_url=database_url, files_root=files_url, public_datasets=[],
                        public_files=["*"], s3_allow_http=True, files_redirect="presigned")
    with InProcess(settings) as app:
        def location(path: str, user_agent: str = "curl/8.5.0") -> str:
            answer = app.get(path, headers={"User-Agent": user_agent})
            assert answer.status_code == 302, answer.text
            return answer.headers["location"]

        signed = location("/files/data/one.bin")
        assert "response-content-disposition=" in signed
        fetched = httpx.get(signed)
        assert fetched.content == ONE
        assert fetched.headers["content-disposition"] == 'attachment; filename="one.bin"'
        assert fetched.headers["content-type"] == "application/octet-stream"
        answer = httpx.get(location(f"/files/{quote('we ird näme %41.txt')}", "Mozilla/5.0"))
        assert answer.content == b"weird\n"
        assert answer.headers["content-disposition"] == (
            "attachment; filename=\"we ird name _41.txt\";"
            " filename*=UTF-8''we%20ird%20n%C3%A4me%20%2541.txt")
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        # A HEAD's redirect is signed for HEAD (a GET's URL answers it 403).
        head = app.head("/files/data/one.bin")
        assert head.status_code == 302
        followed = httpx.head(head.headers["location"])
        assert followed.status_code == 200, followed.status_code
        assert followed.headers["content-length"] == str(len(ONE))
        assert followed.headers["content-disposition"] == 'attachment; filename="one.bin"'
        inline = httpx.get(location("/files/notes.txt?disposition=inline"))
        assert inline.headers["content-disposition"] == 'inline; filename="notes.txt"'
        html = httpx.get(location("/files/page.html?disposition=inline"))
        assert html.headers["content-disposition"] == 'attachment; filename="page.html"'
        assert html.content == HTML
        # The signature covers the parameters: another name is refused by the store.
        forged = signed.replace("one.bin%22", "evil.exe%22")
        assert forged != signed and httpx.get(forged).status_code == 403


def test_a_store_that_is_down_is_503(database_url: str, s3: Seaweed) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3.env.items():
            patch.setenv(name, value)
        patch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        settings = Settings(database_url=database_url, files_root=s3.url("down"),
                            public_datasets=[], public_files=["*"], s3_allow_http=True,
                            s3_timeout=2)
        with InProcess(settings) as app:
            for path in ("/files/x.txt", "/files/"):
                answer = app.get(path)
                assert answer.status_code == 503, (path, answer.status_code, answer.text)
                assert answer.json()["message"] == "the file store is unavailable"
                assert answer.headers["retry-after"] == "5"
                assert "127.0.0.1:9" not in answer.text
            page = app.get("/")  # the page stands, and says why it has no files
            assert page.status_code == 200 and "file store is unavailable" in page.text


def test_healthz_says_when_the_store_is_down(app: InProcess, s3: Seaweed) -> None:
    """/healthz asks the store (at most once per STORE_TTL, however often it is asked),
    says 503 while the store does not answer, and 200 again once it does."""
    store_health = app.state.store_health
    assert store_health is not None and set(store_health.stores) == {"files"}
    first = app.get("/healthz")
    assert first.status_code == 200, first.text
    assert first.json()["store"] == {"status": "ok"}
    checks = store_health.checks
    for _ in range(20):
        assert app.get("/healthz").status_code == 200
    assert store_health.checks - checks <= 1  # one more at most, if the TTL ran out
    store_health.ttl = 0.1  # from here on, what is said of a store that stops and starts
    with s3.paused():
        assert wait_until(lambda: app.get("/healthz").status_code == 503, 30)
        down = app.get("/healthz")
        assert down.headers["retry-after"] == "5"
        body = down.json()
        assert body["status"] == "unavailable" and body["store"]["status"] == "unavailable"
        assert body["error"] == ("the object store is unavailable: the files store did not"
                                 " answer within 1.5 s")
        assert s3.endpoint.removeprefix("http://") not in down.text
    assert wait_until(lambda: app.get("/healthz").status_code == 200, 30)
    assert app.get("/healthz").json()["store"] == {"status": "ok"}


def test_healthz_asks_both_stores(database_url: str, s3: Seaweed, s3_env: None) -> None:
    from exporter.health import StoreHealth

    both = StoreHealth.of(Settings(database_url=database_url, files_root=s3.url("a"),
                                   exports_dir=s3.url("b"), s3_allow_http=True))
    assert both is not None and {r: str(s.url) for r, s in both.stores.items()} == {
        "files": s3.url("a"), "exports": s3.url("b")}
    assert StoreHealth.of(Settings(database_url=database_url)) is None
    # A bucket that is not there fails the check (a HEAD of an object could not tell).
    missing = StoreHealth.of(Settings(database_url=database_url,
                                      files_root="s3://no-such-bucket-here/x",
                                      s3_allow_http=True))
    assert missing is not None
    assert asyncio.run(missing.problem()) == "the files store failed (see the log)"
    assert asyncio.run(both.problem()) is None


# --- Real clients through a real server -----------------------------------------------
@pytest.fixture(scope="module")
def server(make_module_server: type[Server], files_url: str, s3: Seaweed) -> Server:
    return make_module_server({**s3.env, "EXPORTER_FILES_ROOT": files_url}).start()


@pytest.mark.needs("curl")
def test_curl_follows_a_presigned_redirect_to_the_file_name(
        make_server: type[Server], files_url: str, s3: Seaweed, tmp_path: Path) -> None:
    """`curl -L -OJ` through the server's 302 to the store saves under the file's name
    (the URL's last segment would be `we%20ird%20n%C3%A4me%20%2541.txt`): a name that is
    not ASCII in its fallback, as curl reads `filename=` only."""
    server = make_server({**s3.env, "EXPORTER_FILES_ROOT": files_url,
                          "EXPORTER_FILES_REDIRECT": "presigned"}).start()
    for path in ("data/one.bin", quote("we ird näme %41.txt")):
        subprocess.run(["curl", "-sS", "--fail", "-L", "-OJ", f"{server.url}/files/{path}"],
                       cwd=tmp_path, check=True, timeout=60)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["one.bin", "we ird name _41.txt"]
    assert (tmp_path / "one.bin").read_bytes() == ONE
    assert (tmp_path / "we ird name _41.txt").read_bytes() == b"weird\n"


@pytest.mark.needs("curl", "wget")
def test_curl_and_wget_resume_from_the_store(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/files/large.bin"
    half = tmp_path / "curl.bin"
    half.write_bytes(LARGE[:1_000_000])
    subprocess.run(["curl", "-sS", "--fail", "-C", "-", "-o", str(half), url], check=True,
                   timeout=60)
    assert half.read_bytes() == LARGE
    partial = tmp_path / "large.bin"
    partial.write_bytes(LARGE[:3_333_333])
    subprocess.run(["wget", "-q", "-c", url], cwd=tmp_path, check=True, timeout=60)
    assert partial.read_bytes() == LARGE
    named = subprocess.run(["curl", "-sS", "--fail", "-OJ",
                            f"{server.url}/files/{quote('we ird näme %41.txt')}"],
                           cwd=tmp_path, check=True, timeout=60)
    assert named.returncode == 0
    assert (tmp_path / "we ird n\u00e4me %41.txt").read_bytes() == b"weird\n"


def test_a_replaced_object_is_served_new_and_resumes_refuse_the_old(
        app: InProcess, s3: Seaweed, files_url: str) -> None:
    """A resume with If-Range of the old ETag gets the new object whole, never a splice."""
    store = raw_store(s3, StoreUrl.parse(files_url).prefix)
    obstore.put(store, "scratch/changing.txt", b"first version")
    old = app.get("/files/scratch/changing.txt")
    obstore.put(store, "scratch/changing.txt", b"second version!")
    resumed = app.get("/files/scratch/changing.txt", headers={"Range": "bytes=6-",
                                                      "If-Range": old.headers["etag"]})
    assert resumed.status_code == 200 and resumed.content == b"second version!"


def test_store_objects_run_on_asyncio(app: InProcess) -> None:
    # The store's client lives on the app's loop: many requests at once all succeed.
    async def many() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app),
                                     base_url=app.url) as client:
            answers = await asyncio.gather(*(client.get(
                "/files/data/one.bin", headers={"Range": f"bytes={i}-{i + 9}"})
                for i in range(20)))
        return [a.status_code for a in answers]

    assert app.run(many()) == [206] * 20


def test_the_corpus_files_requests_against_the_store(server: Server, database_url: str) -> None:
    """tests/corpus/requests.http's /files/ entries, against files in the store."""
    token = new_token(database_url, f"corpus-s3-{os.urandom(4).hex()}", "admin", "files:*")
    entries = [e for e in ENTRIES if e.request_line.split(" ")[1].startswith("/files/")]
    assert len(entries) > 20
    for entry in entries:
        answer = send(server.url, entry, token)
        assert answer.status < 500, (entry.label, answer.status, answer.body[:500])
        assert b"SECRET" not in answer.body, entry.label
        if "safe-inline" in entry.expect and answer.status == 200:
            assert answer.headers["content-disposition"].startswith("attachment") \
                or "sandbox" in answer.headers["content-security-policy"], entry.label


def test_compressed_on_the_fly_from_the_store(app: InProcess) -> None:
    text = OBJECTS["notes.txt"]
    gzipped = app.get("/files/notes.txt", headers={"Accept-Encoding": "gzip"})
    assert gzipped.headers["content-encoding"] == "gzip"
    assert gzipped.content == text  # httpx decodes it
    assert gzipped.headers["vary"] == "Accept-Encoding"
    ranged = app.get("/files/notes.txt", headers={"Accept-Encoding": "gzip",
                                                  "Range": "bytes=0-9"})
    assert "content-encoding" not in ranged.headers and ranged.content == text[:10]


@pytest.mark.parametrize(("settings", "says"), [
    ({"files_root": "s3://Bad_Bucket/x"}, "not a bucket name"),
    ({"files_root": "s3://bucket/a/../b"}, "not a prefix"),
    ({"files_root": "/srv/files", "files_redirect": "presigned"}, "needs the files in object"),
    ({"files_root": "s3://bucket/x", "files_accel_redirect": "/internal/"},
     "EXPORTER_FILES_REDIRECT=presigned"),
    ({"files_redirect": "sometimes"}, "presigned"),
])
def test_settings_that_do_not_fit(settings: dict[str, str], says: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        Settings(database_url="postgresql://x@localhost/x", **settings)  # type: ignore[arg-type]


def test_signed_links_and_a_second_host(database_url: str, files_url: str, s3_env: None,
                                        app: InProcess) -> None:
    """A link made on one host serves the object on another host of the same store, which
    gives the same ETag, so a download started on one resumes on the other."""
    settings = Settings(database_url=database_url, files_root=files_url, public_datasets=[],
                        public_files=[], s3_allow_http=True)
    token = new_token(database_url, f"s3-links-{os.urandom(4).hex()}", "files:data/")
    with InProcess(settings) as closed:
        auth = {"Authorization": f"Bearer {token}"}
        made = closed.request("POST", "/links", headers=auth,
                              json={"url": "/files/data/one.bin", "expires_in": "15m"})
        assert made.status_code in (200, 201), made.text
        link = made.json()["url"]
        path = link[link.index("/files/"):]
        assert closed.get("/files/data/one.bin").status_code == 401
        first = closed.get(path, headers={"Range": "bytes=0-99"})
        assert first.status_code == 206 and first.content == ONE[:100]
        rest = app.get(path, headers={"Range": "bytes=100-",
                                      "If-Range": first.headers["etag"]})
        assert rest.status_code == 206 and first.content + rest.content == ONE
        refused = closed.request("POST", "/links", headers=auth,
                                 json={"url": "/files/README.txt"})
        assert refused.status_code == 403


def test_exporter_digest_over_the_store(app: InProcess, database_url: str, files_url: str,
                                        s3: Seaweed) -> None:
    """`exporter digest` reads the objects no download hashed yet, not the hidden ones."""
    store = raw_store(s3, StoreUrl.parse(files_url).prefix)
    text = b"digested ahead of any download\n"
    obstore.put(store, "scratch/digest/ahead.txt", text)
    obstore.put(store, "scratch/digest/.hidden", b"SECRET")
    done = exporter_cli("digest", "scratch/digest/", env={
        "EXPORTER_DATABASE_URL": database_url, "EXPORTER_FILES_ROOT": files_url,
        "EXPORTER_S3_ALLOW_HTTP": "true"})
    assert done.returncode == 0, done.stderr
    assert "1 files, 0 digests known, 1 to compute" in done.stderr
    head = app.head("/files/scratch/digest/ahead.txt")
    assert head.headers["repr-digest"] == sha256_header(text)
    again = exporter_cli("digest", "scratch/digest/ahead.txt", env={
        "EXPORTER_DATABASE_URL": database_url, "EXPORTER_FILES_ROOT": files_url,
        "EXPORTER_S3_ALLOW_HTTP": "true"})
    assert "1 files, 1 digests known, 0 to compute" in again.stderr


def test_an_object_replaced_between_two_parts_cuts_the_answer(
        server: Server, s3: Seaweed, files_url: str, database_url: str) -> None:
    """Each part is a GET with If-Match of the ETag the headers carried: a multi-range
    answer whose object is replaced before its last part is cut, never a splice."""
    store = raw_store(s3, StoreUrl.parse(files_url).prefix)
    # The first part larger than what the kernel buffers (a send buffer grows to 4 MiB):
    # the server is still in it while this reads nothing.
    old = os.urandom(12 * 1024 * 1024)
    obstore.put(store, "scratch/cut.bin", old)
    first, last = f"0-{len(old) - 100}", f"{len(old) - 10}-{len(old) - 1}"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connecting
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /files/scratch/cut.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"Range: bytes={first},{last}\r\n\r\n".encode())
        data = sock.recv(16 * 1024)
        assert data.startswith(b"HTTP/1.1 206")
        obstore.put(store, "scratch/cut.bin", os.urandom(len(old)))
        while chunk := sock.recv(1024 * 1024):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    assert len(body) < length  # cut: the client sees a broken download
    assert old[-10:] not in body
    rows = audited(database_url, "target = $1", "scratch/cut.bin")
    assert rows[-1]["status"] == "failed"


def test_an_object_gone_or_replaced_after_its_head_is_an_http_error(
        app: InProcess, s3: Seaweed, files_url: str) -> None:
    """The first part's GET is made before the answer starts: what happened to the
    object since its HEAD is a 404 or a 503 to ask again, not a broken 200."""
    from exporter.errors import ApiError
    from exporter.files import ranges
    from exporter.files.source import StoreFile
    from exporter.files.store import object_key

    store = raw_store(s3, StoreUrl.parse(files_url).prefix)
    obstore.put(store, "scratch/moving.txt", b"first")
    files_store = app.state.files_store
    assert files_store is not None
    info = app.run(files_store.head("scratch/moving.txt"))
    layout = ranges.whole(info.size, "text/plain")
    obstore.put(store, "scratch/moving.txt", b"other")
    with pytest.raises(ApiError) as changed:
        app.run(StoreFile(files_store, info, object_key(info.key, info)).prepare(layout, 1024))
    assert changed.value.status == 503
    obstore.delete(store, "scratch/moving.txt")
    with pytest.raises(ApiError) as gone:
        app.run(StoreFile(files_store, info, object_key(info.key, info)).prepare(layout, 1024))
    assert gone.value.status == 404
    # Prepared and then let go (HEAD, an error before the body): its GET is closed.
    obstore.put(store, "scratch/moving.txt", b"third")
    fresh = app.run(files_store.head("scratch/moving.txt"))
    opened = StoreFile(files_store, fresh, object_key(fresh.key, fresh))
    app.run(opened.prepare(ranges.whole(fresh.size, "text/plain"), 1024))
    assert opened.first is not None
    app.run(opened.close())
    assert opened.first is None
