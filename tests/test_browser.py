"""The page and CORS in a real browser: Debian's Chromium, driven by Playwright.

Playwright's own browser downloads are never used: it launches /usr/bin/chromium
(scripts/test installs it). Screenshots of the page go to var/screenshots/.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from exporter.exports.operators import TABLE
from exporter.files.demo import UNICODE_NAME
from tests.support import TEST_TMP, Server, wait_until
from tests.test_access import CLOSED, bearer, new_token

CHROMIUM = "/usr/bin/chromium"
# --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# For a person to look at after a run; outside the checkout, as everything tests write.
SCREENSHOTS = TEST_TMP / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.needs("chromium")


@pytest.fixture(scope="module")
def closed(make_module_server: type[Server]) -> Server:
    """One closed server for the module: its tests change tokens and cookies, not it."""
    return make_module_server(CLOSED).start()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(accept_downloads=True, viewport=DESKTOP)
    ctx.set_default_timeout(20_000)
    try:
        yield ctx
    finally:
        ctx.close()


def unique(name: str) -> str:
    return f"{name}-{os.urandom(3).hex()}"


def sign_in(page: Page, token: str) -> None:
    """As a person would: type the token into the page's form and submit it."""
    page.fill("#token", token)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("form[action='/session/end']")


def download(page: Page, selector: str) -> tuple[str, bytes]:
    with page.expect_download() as info:
        page.click(selector)
    d = info.value
    return d.suggested_filename, Path(d.path()).read_bytes()


def test_page_signs_in_and_downloads(closed: Server, context: BrowserContext,
                                     database_url: str, files_root: Path) -> None:
    server = closed
    # The two datasets by name: the database is shared with tests that add their own.
    token = new_token(database_url, unique("browser"), "datasets:orders",
                      "datasets:daily_revenue", "files:*")
    page = context.new_page()

    page.goto(server.url + "/")
    assert page.is_visible("#sign-in")
    assert page.locator("#datasets, #files").count() == 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "signed-out-desktop.png", full_page=True)

    sign_in(page, token)
    cookie, = (c for c in context.cookies() if c["name"] == "exporter_token")
    assert (cookie["value"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        token, True, "Strict", "/")
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script on the page reads it
    assert token not in page.content()
    assert page.locator("article.dataset").evaluate_all("els => els.map(e => e.dataset.dataset)") \
        == ["daily_revenue", "orders"]

    page.screenshot(path=SCREENSHOTS / "page-desktop.png", full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=SCREENSHOTS / "page-phone.png", full_page=True)
    page.set_viewport_size(DESKTOP)

    # The whole export, as the plain link gives it: byte for byte what a script gets.
    name, saved = download(page, "article[data-dataset=orders] a[data-format=csv]")
    assert re.fullmatch(r"orders-\d{8}T\d{6}Z\.csv", name), name
    expected = httpx.get(server.url + "/datasets/orders.csv", headers=bearer(token), timeout=60)
    assert expected.status_code == 200 and len(saved) > 100_000
    assert saved == expected.content

    # The non-ASCII file name, from the file browser.
    name, saved = download(page, f"#files a[download]:text-is('{UNICODE_NAME}')")
    assert name == UNICODE_NAME
    assert saved == (files_root / UNICODE_NAME).read_bytes()

    # Into a folder and out again, server-rendered.
    page.click("#files a:text-is('nested/')")
    assert page.url.endswith("/?path=nested/#files")
    assert page.locator("#files a[download]").all_inner_texts() == ["data.json", "up-link.txt"]
    name, saved = download(page, "#files a:text-is('data.json')")
    assert (name, saved) == ("data.json", (files_root / "nested" / "data.json").read_bytes())

    page.click("form[action='/session/end'] button")
    page.wait_for_selector("#sign-in")
    assert [c for c in context.cookies() if c["name"] == "exporter_token"] == []
    assert page.locator("#datasets").count() == 0


def test_filter_builder_writes_the_query(closed: Server, context: BrowserContext,
                                         database_url: str) -> None:
    server = closed
    token = new_token(database_url, unique("builder"), "datasets:orders")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = context.new_page()
    page.goto(server.url + "/")
    sign_in(page, token)
    # A token for orders alone sees orders alone, and no files.
    assert page.locator("article.dataset").count() == 1
    assert page.locator("#files").count() == 0

    card = page.locator("article[data-dataset=orders]")
    card.locator("summary:text-is('Choose rows')").click()
    card.locator("button.add").click()
    card.locator("button.add").click()
    first, second = card.locator(".filter").all()
    first.locator(".f-col").select_option("id")
    first.locator(".f-op").select_option("lt")
    first.locator(".value").fill("500")
    second.locator(".f-col").select_option("paid")
    second.locator(".f-op").select_option("is")
    second.locator(".value").select_option("true")  # is.'s keywords: a list to pick from
    card.locator(".pick[value=id]").check()
    card.locator(".pick[value=paid]").check()
    card.locator(".order-col").select_option("id")
    card.locator(".order-dir").select_option("desc")
    card.locator(".limit").fill("25")

    page.screenshot(path=SCREENSHOTS / "builder-desktop.png", full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=SCREENSHOTS / "builder-phone.png", full_page=True)
    page.set_viewport_size(DESKTOP)

    query = "id=lt.500&paid=is.true&select=id,paid&order=id.desc&limit=25"
    url = f"{server.url}/datasets/orders.csv?{query}"
    assert card.locator("a[data-format=csv]").get_attribute("href") == url
    assert card.locator(".curl").inner_text() == (
        f"curl -fOJ -H \"Authorization: Bearer $EXPORTER_TOKEN\" '{url}'")
    card.locator(".cmd-format").select_option("ndjson")
    assert card.locator(".wget").inner_text() == (
        "wget --content-disposition --header=\"Authorization: Bearer $EXPORTER_TOKEN\" "
        f"'{url.replace('.csv?', '.ndjson?')}'")

    # One format choice: back to CSV, whose link is then the one shown.
    card.locator(".cmd-format").select_option("csv")
    name, saved = download(page, "article[data-dataset=orders] a[data-format=csv]")
    assert name.endswith(".csv")
    expected = httpx.get(url, headers=bearer(token), timeout=60)
    assert expected.status_code == 200 and saved == expected.content
    lines = saved.decode().splitlines()
    assert lines[0] == "id,paid" and len(lines) == 26
    assert all(line.split(",")[1] == "t" for line in lines[1:])
    ids = [int(line.split(",")[0]) for line in lines[1:]]
    assert ids == sorted(ids, reverse=True) and max(ids) < 500

    # The operators are the server's table (exporter/exports/operators.py), labels in
    # words; a list operator's values get their parentheses, its hint shows.
    # A bigint column is offered the conditions a number has (no "contains", no regex).
    offered = [o.label for o in TABLE if o.fits("N", "bigint")]
    assert first.locator(".f-op option").all_inner_texts() == offered
    assert "matches the regular expression" not in offered and "contains" not in offered
    card.locator("button.add").click()
    third = card.locator(".filter").last
    third.locator(".f-col").select_option("id")
    third.locator(".f-op").select_option("in")
    # One value a line (commas are data: tests/test_page.py).
    assert third.locator(".value").get_attribute("placeholder") == "one value a line"
    third.locator(".value").fill("7\n8")
    listed = query.replace("&select", "&id=in.(7,8)&select")
    assert card.locator("a[data-format=csv]").get_attribute("href") == (
        f"{server.url}/datasets/orders.csv?{listed}")


def test_rejected_cookie_shows_sign_in_again(closed: Server,
                                             context: BrowserContext) -> None:
    server = closed
    context.add_cookies([{"name": "exporter_token", "value": "exp_" + "x" * 43,
                          "url": server.url}])
    page = context.new_page()
    page.goto(server.url + "/")
    assert page.is_visible("#sign-in")
    assert "no longer valid" in page.inner_text("main")
    page.fill("#token", "exp_not-a-token")
    page.click("#sign-in button[type=submit]")
    page.wait_for_url("**/?signin=failed")
    assert "unknown, revoked or expired" in page.inner_text("main")


# A web app on another origin: it fetches with a token and reads what CORS exposes.
APP = """<!doctype html><meta charset="utf-8"><title>app</title>
<script>
const EXPOSED = ["content-disposition", "content-range", "content-length", "etag",
                 "repr-digest", "content-type", "accept-ranges", "last-modified"];
async function grab(url, token, extra) {
  const headers = Object.assign(token ? {Authorization: "Bearer " + token} : {}, extra || {});
  try {
    // no-store: the range answer must come from the server, not from the first read cached.
    const r = await fetch(url, {headers, cache: "no-store"});
    const seen = {};
    for (const h of EXPOSED) seen[h] = r.headers.get(h);
    return {status: r.status, text: await r.text(), headers: seen};
  } catch (e) {
    return {rejected: e.name + ": " + e.message};
  }
}
</script>"""


class _App(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = APP.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def app_origins() -> Iterator[tuple[str, str]]:
    """Two static web apps on loopback ports: the first is listed, the second is not."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        listed, unlisted = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
        yield listed, unlisted
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(5)


def test_web_app_on_another_origin_fetches_with_a_token(
        make_server: type[Server], context: BrowserContext, database_url: str,
        files_root: Path, app_origins: tuple[str, str]) -> None:
    listed, unlisted = app_origins
    server = make_server({**CLOSED, "EXPORTER_CORS_ORIGINS": json.dumps([listed])}).start()
    token = new_token(database_url, unique("spa"), "datasets:orders", "files:*")
    only_data = new_token(database_url, unique("spa-data"), "datasets:orders")
    page = context.new_page()
    page.goto(listed + "/app.html")

    def grab(path: str, token: str | None, extra: dict[str, str] | None = None) -> dict:
        result: dict = page.evaluate("([u, t, x]) => grab(u, t, x)",
                                     [server.url + path, token, extra])
        return result

    export = grab("/datasets/orders.csv?limit=5", token)
    expected = httpx.get(server.url + "/datasets/orders.csv?limit=5", headers=bearer(token))
    assert export["status"] == 200 and export["text"] == expected.text
    assert re.fullmatch(r'attachment; filename="orders-\d{8}T\d{6}Z-[0-9a-f]{8}\.csv"',
                        export["headers"]["content-disposition"])

    readme = (files_root / "README.txt").read_bytes()
    whole = grab("/files/README.txt", token)
    # A whole read records the SHA-256, just after its last byte went out.
    assert wait_until(lambda: "repr-digest" in httpx.head(
        server.url + "/files/README.txt", headers=bearer(token)).headers, 10)
    assert whole["text"].encode() == readme
    assert whole["headers"]["content-length"] == str(len(readme))
    part = grab("/files/README.txt", token, {"Range": "bytes=0-9"})
    assert part["status"] == 206 and part["text"].encode() == readme[:10]
    assert part["headers"]["content-range"] == f"bytes 0-9/{len(readme)}"
    assert part["headers"]["etag"] == whole["headers"]["etag"] is not None
    digest = base64.b64encode(hashlib.sha256(readme).digest()).decode()
    assert part["headers"]["repr-digest"] == f"sha-256=:{digest}:"
    name = grab("/files/" + quote(UNICODE_NAME), token)["headers"]["content-disposition"]
    assert name.endswith("filename*=UTF-8''" + quote(UNICODE_NAME, safe=""))

    # Refusals are readable too, so the app can say why.
    assert grab("/datasets/orders.csv", None)["status"] == 401
    denied = grab("/files/README.txt", only_data)
    assert denied["status"] == 403 and json.loads(denied["text"])["error"]["status"] == 403

    # The same page from an origin that is not listed: the browser refuses the answer.
    page.goto(unlisted + "/app.html")
    refused = grab("/datasets/orders.csv?limit=5", token)
    assert refused.get("rejected", "").startswith("TypeError"), refused
    plain = httpx.get(server.url + "/datasets/orders.csv?limit=5",
                      headers={**bearer(token), "Origin": unlisted})
    assert plain.status_code == 200
    assert not [h for h in plain.headers if h.lower().startswith("access-control-")]
