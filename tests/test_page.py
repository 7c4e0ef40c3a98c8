"""The page for people who download, in Chromium at 390 px and 1280 px: errors shown on the
page, the builder's result equal to the SQL, lists whose values hold commas, copy buttons,
prepared (stored) exports with their progress, the keyboard alone, and an axe-core audit.

Each test runs at both widths, on one closed server for the module and the browser modules'
one Chromium (tests/conftest.py), in a context of its own that starts signed in;
screenshots go to the test's tmp_path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import axe_playwright_python
import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page

from tests.support import Server, fetch, run_sql, wait_until
from tests.test_access import CLOSED, bearer, new_token
from tests.test_browser import DESKTOP, PHONE, sign_in

pytestmark = pytest.mark.needs("chromium")

AXE = (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()
# A view slow enough that a prepared export shows its progress: about 4 s of rows, each
# wide enough that PostgreSQL's COPY flushes every few dozen of them.
SLOW = "slow_export"
SLOW_ROWS = 2500
MANY = 1200  # files in one folder: more than a page of the listing (1,000)


@pytest.fixture(scope="module")
def site(make_module_server: type[Server], database_url: str, files_root: Path
         ) -> Iterator[tuple[Server, str]]:
    """A closed server, a token for everything on it, the slow view and a big folder
    (both removed afterwards: other modules count the datasets and files)."""
    run_sql(database_url, f"""CREATE VIEW exports.{SLOW} AS
        SELECT g AS id, repeat('x', 200) AS pad, pg_sleep(0.0016)::text AS slept
        FROM generate_series(1, {SLOW_ROWS}) AS g""")
    many = files_root / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"f{i:04d}.txt").write_bytes(b"x" * (i + 1))
    (many / "zz-folder").mkdir()  # last by name, first on the page
    try:
        server = make_module_server(CLOSED).start()
        token = new_token(database_url, f"page-{os.urandom(3).hex()}", "datasets:*", "files:*")
        yield server, token
    finally:
        run_sql(database_url, f"DROP VIEW IF EXISTS exports.{SLOW}")
        shutil.rmtree(many)


@pytest.fixture(scope="module")
def signed_in() -> dict[int, Any]:
    """Per width, the cookies of one sign-in through the page's form with the site's token:
    each test's context starts with them (tests/test_browser.py signs in for real)."""
    return {}


@pytest.fixture(params=[PHONE, DESKTOP], ids=["390px", "1280px"])
def context(request: pytest.FixtureRequest, browser: Browser, site: tuple[Server, str],
            signed_in: dict[int, Any]) -> Iterator[BrowserContext]:
    """A context of the test's own (pages, permissions, downloads), signed in as the site's
    token."""
    width = request.param["width"]
    ctx = browser.new_context(accept_downloads=True, viewport=request.param,
                              storage_state=signed_in.get(width))
    ctx.set_default_timeout(20_000)
    try:
        if width not in signed_in:
            page = ctx.new_page()
            page.goto(site[0].url + "/")
            sign_in(page, site[1])
            page.close()
            signed_in[width] = ctx.storage_state()
        yield ctx
    finally:
        ctx.close()


def open_page(site: tuple[Server, str], context: BrowserContext, path: str = "/") -> Page:
    server, token = site
    page = context.new_page()
    if not any(c["name"] == "exporter_token" and c["value"] == token
               for c in context.cookies()):  # another token than the site's: its own sign-in
        context.clear_cookies()
        page.goto(server.url + "/")
        sign_in(page, token)
        if path == "/":
            return page
    page.goto(server.url + path)
    return page


def shot(page: Page, tmp_path: Path, name: str) -> None:
    width = page.viewport_size["width"] if page.viewport_size else 0
    page.screenshot(path=tmp_path / f"{name}-{width}.png", full_page=True)
    assert (tmp_path / f"{name}-{width}.png").stat().st_size > 1000


def audit(page: Page) -> list[str]:
    """axe-core's rules (WCAG 2 A and AA, and its best practices) on the page as it is."""
    page.evaluate(AXE)
    result: dict[str, Any] = page.evaluate(
        "axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']}: {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
            for v in result["violations"]]


def card(page: Page, name: str = "orders") -> Locator:
    return page.locator(f"article[data-dataset={name}]")


def add_filter(c: Locator, column: str, condition: str) -> Locator:
    c.locator("button.add").click()
    row = c.locator(".filter").last
    row.locator(".f-col").select_option(column)
    row.locator(".f-op").select_option(label=condition)
    return row


def download(page: Page, link: Locator) -> tuple[str, bytes]:
    with page.expect_download() as info:
        link.click()
    d = info.value
    return d.suggested_filename, Path(d.path()).read_bytes()


def select(database_url: str, query: str) -> list[Any]:
    """tests.support.fetch, in a thread of its own: Playwright's sync API holds an event
    loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fetch, database_url, query).result(60)


def csv_rows(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode())))


def test_an_error_is_shown_not_a_cancelled_download(site: tuple[Server, str],
                                                    context: BrowserContext,
                                                    tmp_path: Path, files_root: Path) -> None:
    page = open_page(site, context)
    c = card(page)
    c.locator("summary:text-is('Choose rows')").click()
    # amount is a number: the field takes no letters, so `amount=gt.abc` cannot be built.
    amount = add_filter(c, "amount", "is greater than").locator(".value")
    assert amount.get_attribute("type") == "number"
    amount.press_sequentially("abc")
    assert amount.input_value() == ""
    c.locator(".filter button[aria-label='Remove this filter']").click()
    # A value the field takes but the column's type does not: the server's 400, on the page.
    add_filter(c, "order_uuid", "equals").locator(".value").fill("abc")
    downloads: list[object] = []
    page.on("download", lambda d: downloads.append(d))
    c.locator("a[data-format=csv]").click()
    error = c.locator(".export-error")
    error.wait_for(state="visible")
    assert re.fullmatch(r"Not downloaded\. 400: 'abc' is not a valid uuid for column"
                        r" 'order_uuid'.*", error.inner_text()), error.inner_text()
    assert error.get_attribute("role") == "alert"
    shot(page, tmp_path, "error")
    page.wait_for_timeout(500)
    assert downloads == []
    # Preparing the same download says the same, and starts nothing.
    c.locator("button.prepare").click()
    page.wait_for_function(
        "e => e.textContent.startsWith('Not started. 400:')", arg=error.element_handle())
    assert "'abc' is not a valid uuid" in error.inner_text()

    # A file gone since the page was shown: its 404, not a cancelled download.
    gone = files_root / f"gone-{os.urandom(3).hex()}.txt"
    gone.write_bytes(b"soon gone")
    try:
        page.reload()
    finally:
        gone.unlink()
    page.locator(f"#files a[download]:text-is('{gone.name}')").click()
    files_error = page.locator("#files .files-error")
    files_error.wait_for(state="visible")
    assert "404" in files_error.inner_text() and "Not downloaded" in files_error.inner_text()
    assert downloads == []


def test_the_builder_downloads_what_the_sql_selects(site: tuple[Server, str],
                                                    context: BrowserContext, tmp_path: Path,
                                                    database_url: str) -> None:
    page = open_page(site, context)
    c = card(page)
    c.locator("summary:text-is('Choose rows')").click()
    add_filter(c, "amount", "is greater than").locator(".value").fill("5000.5")
    ship = add_filter(c, "ship_date", "is at least").locator(".value")
    assert ship.get_attribute("type") == "date"
    ship.fill("2026-01-05")
    created = add_filter(c, "created_at", "is less than").locator(".value")
    assert created.get_attribute("type") == "datetime-local"
    created.fill("2026-01-04T06:30:15")
    zones = c.locator(".filter .zone:visible")
    assert zones.all_inner_texts() == ["UTC"]  # timestamptz only: the field has no zone
    paid = add_filter(c, "paid", "equals").locator(".value")
    assert paid.evaluate("e => e.tagName") == "SELECT"
    paid.select_option("true")
    empty = add_filter(c, "note", "is").locator(".value")
    assert empty.locator("option").all_inner_texts() == ["empty (null)", "not empty"]
    empty.select_option("not_null")
    # The operators in words, as the exports' table names them.
    labels = c.locator(".filter").first.locator(".f-op option").all_inner_texts()
    assert {"equals", "is greater than", "is one of", "is"} <= set(labels)
    for column in ("id", "amount", "created_at", "paid"):
        c.locator(f".pick[value={column}]").check()
    c.locator(".limit").fill("40")  # no order chosen: the key orders it
    shot(page, tmp_path, "builder")
    # A timestamp fits its field; with the builder scrolled to its top (filters built,
    # the card taller than a phone's screen), the downloads are still on screen.
    assert (created.bounding_box() or {"width": 0})["width"] >= 200
    c.locator(".filter").first.evaluate("e => e.scrollIntoView({block: 'start'})")
    box = page.evaluate("""() => {
        const r = document.querySelector('article[data-dataset=orders] a[data-format=csv]')
            .getBoundingClientRect();
        return [r.top, r.bottom, window.innerHeight];
    }""")
    assert box[0] >= 0 and box[1] <= box[2], box

    link = c.locator("a[data-format=csv]")
    href = link.get_attribute("href") or ""
    assert href.endswith("&select=id,amount,created_at,paid&order=id&limit=40"), href
    assert "created_at=lt.2026-01-04T06:30:15Z" in href and "ship_date=gte.2026-01-05" in href
    name, saved = download(page, link)
    assert name.endswith(".csv")
    rows = csv_rows(saved)
    assert rows[0] == ["id", "amount", "created_at", "paid"]
    expected = select(database_url, """
        SELECT id, amount, created_at, paid FROM exports.orders
        WHERE amount > 5000.5 AND ship_date >= '2026-01-05'
          AND created_at < '2026-01-04T06:30:15Z' AND paid = true AND note IS NOT NULL
        ORDER BY id LIMIT 40""")
    assert len(expected) == 40
    assert [(int(r[0]), Decimal(r[1]), r[3]) for r in rows[1:]] == [
        (e["id"], e["amount"], "t") for e in expected]
    # The same rows every time: the limit is ordered, so a second download is equal.
    again = download(page, link)[1]
    assert again == saved


def test_is_one_of_takes_values_with_commas(site: tuple[Server, str],
                                            context: BrowserContext, tmp_path: Path,
                                            database_url: str) -> None:
    page = open_page(site, context)
    c = card(page)
    c.locator("summary:text-is('Choose rows')").click()
    values = add_filter(c, "customer", "is one of").locator(".value")
    assert values.evaluate("e => e.tagName") == "TEXTAREA"
    values.fill('Smith, John\nAhmed "the Great"\nO\'Brien & Sons')
    c.locator(".pick[value=id]").check()
    c.locator(".pick[value=customer]").check()
    c.locator(".order-col").select_option("id")
    c.locator(".limit").fill("60")
    shot(page, tmp_path, "in-list")
    href = c.locator("a[data-format=csv]").get_attribute("href") or ""
    assert "customer=in.(%22Smith,%20John%22,%22Ahmed%20%5C%22the%20Great%5C%22%22," in href
    _, saved = download(page, c.locator("a[data-format=csv]"))
    rows = csv_rows(saved)
    expected = select(database_url, """SELECT id, customer FROM exports.orders
        WHERE customer IN ('Smith, John', 'Ahmed "the Great"', 'O''Brien & Sons')
        ORDER BY id LIMIT 60""")
    assert rows[1:] == [[str(e["id"]), e["customer"]] for e in expected]
    assert {r[1] for r in rows[1:]} == {"Smith, John", 'Ahmed "the Great"', "O'Brien & Sons"}


def test_copy_buttons_copy(site: tuple[Server, str], context: BrowserContext,
                           tmp_path: Path, files_root: Path) -> None:
    server, token = site
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    # A file whose SHA-256 the server knows: read whole once.
    readme = (files_root / "README.txt").read_bytes()
    httpx.get(server.url + "/files/README.txt", headers=bearer(token))
    assert wait_until(lambda: "repr-digest" in httpx.head(
        server.url + "/files/README.txt", headers=bearer(token)).headers, 10)
    page = open_page(site, context)

    def clipboard() -> str:
        text: str = page.evaluate("navigator.clipboard.readText()")
        return text

    c = card(page)
    c.locator("summary:text-is('Choose rows')").click()
    c.locator(".limit").fill("5")
    curl = c.locator(".curl").inner_text()
    assert curl.endswith("/datasets/orders.csv?order=id&limit=5'")
    c.locator("button[aria-label='Copy the curl command for orders']").click()
    assert clipboard() == curl
    c.locator("button[aria-label='Copy the wget command for orders']").click()
    assert clipboard() == c.locator(".wget").inner_text()
    page.locator(".token-hint button.copy").click()
    assert clipboard().startswith("exporter token create --name ")

    row = page.locator("#files tr", has=page.locator("a[download]:text-is('README.txt')"))
    row.locator("details.sha summary").click()
    hex_digest = hashlib.sha256(readme).hexdigest()
    assert row.locator("code.hex").inner_text() == hex_digest
    row.locator("button[aria-label='Copy the SHA-256 of README.txt']").click()
    assert clipboard() == hex_digest
    row.locator("button[aria-label='Copy the command that checks README.txt']").click()
    check = clipboard()
    assert check == f"echo '{hex_digest}  README.txt' | sha256sum -c"
    shot(page, tmp_path, "copy")
    # The line checks the file as a browser saved it.
    (tmp_path / "README.txt").write_bytes(readme)
    done = subprocess.run(["sh", "-c", check], cwd=tmp_path, capture_output=True, timeout=30)
    assert done.returncode == 0 and done.stdout == b"README.txt: OK\n", done


def test_prepared_download_shows_progress_then_the_file(
        site: tuple[Server, str], context: BrowserContext, tmp_path: Path,
        database_url: str) -> None:
    page = open_page(site, context)
    c = card(page, SLOW)
    prepare = c.locator("button.prepare")
    assert prepare.inner_text() == "Prepare CSV download"
    prepare.click()
    item = page.locator("#prepared li.prepared-item").first
    item.locator("progress").wait_for()
    # Rows and a percent while it runs (the estimate is the planner's).
    assert wait_until(lambda: re.search(r"[1-9][\d,]* rows \(\d+%\)", item.inner_text())
                      is not None, 20), item.inner_text()
    shot(page, tmp_path, "preparing")
    # A reload lists it again, from GET /exports.
    page.reload()
    item = page.locator("#prepared li.prepared-item").first
    item.wait_for()
    link = item.locator("a[download]")
    link.wait_for(timeout=60_000)
    text = item.inner_text()
    hex_digest = item.locator("code.hex").inner_text()
    assert re.fullmatch(r"[0-9a-f]{64}", hex_digest)
    assert f"{SLOW_ROWS:,} rows" in text
    shot(page, tmp_path, "prepared")
    name, saved = download(page, link)
    assert hashlib.sha256(saved).hexdigest() == hex_digest
    assert name.startswith(SLOW) and name.endswith(".csv")
    assert len(csv_rows(saved)) == SLOW_ROWS + 1
    size = item.locator(".size")
    assert size.get_attribute("title") == f"{len(saved):,} bytes"
    assert item.locator("pre.check").inner_text() == (
        f"echo '{hex_digest}  {name}' | sha256sum -c")


def test_keyboard_alone(site: tuple[Server, str], context: BrowserContext,
                        database_url: str, tmp_path: Path) -> None:
    # A person with a token for orders (and the files): the other tests' tables in the
    # shared database would otherwise be cards to tab through first.
    token = new_token(database_url, f"keys-{os.urandom(3).hex()}", "datasets:orders",
                      "files:*")
    page = open_page((site[0], token), context)
    keys = page.keyboard

    # As many presses as the page has things to focus, plus the browser's own stops.
    focusable = "a[href], button, input, select, textarea, summary, [tabindex]"

    def tab_to(selector: str) -> None:
        limit = page.evaluate("s => document.querySelectorAll(s).length", focusable) + 10
        for _ in range(limit):
            keys.press("Tab")
            if page.evaluate("s => document.activeElement.matches(s)", selector):
                return
        raise AssertionError(f"Tab never reached {selector}")

    tab_to("article[data-dataset=orders] summary")  # the columns' list
    tab_to("article[data-dataset=orders] details.choose > summary")
    keys.press("Enter")
    tab_to("article[data-dataset=orders] button.add")
    keys.press("Space")
    # The new filter's column has the focus: type to choose, Tab on, type to choose.
    assert page.evaluate("document.activeElement.classList.contains('f-col')")
    keys.type("amount")
    keys.press("Tab")
    keys.type("is greater")
    keys.press("Tab")
    keys.type("9990")
    c = card(page)
    assert c.locator(".filter .f-col").input_value() == "amount"
    assert c.locator(".filter .f-op").input_value() == "gt"
    tab_to("article[data-dataset=orders] a[data-format=csv]")
    shot(page, tmp_path, "keyboard")
    with page.expect_download() as info:
        keys.press("Enter")
    rows = csv_rows(Path(info.value.path()).read_bytes())
    assert len(rows) > 1 and all(Decimal(r[2]) > 9990 for r in rows[1:])


def test_files_folders_first_sizes_pages_and_crumbs(site: tuple[Server, str],
                                                    context: BrowserContext,
                                                    tmp_path: Path) -> None:
    page = open_page(site, context, "/?path=many/")
    names = page.locator("#files tbody td.name > a").all_inner_texts()
    assert names[0] == "zz-folder/" and names[1] == "f0000.txt" and len(names) == 1000
    size = page.locator("#files tr", has=page.locator("a:text-is('f0099.txt')")).locator(".size")
    assert (size.inner_text(), size.get_attribute("title")) == ("100 Bytes", "100 bytes")
    crumbs = page.locator("nav.crumbs a")
    assert crumbs.all_inner_texts() == ["files", "many"]
    assert crumbs.last.get_attribute("aria-current") == "page"
    assert "Showing the first 1000 of 1201 entries" in page.inner_text("#files")
    # The screen only: a full page of 1,000 rows is a slow screenshot.
    page.screenshot(path=tmp_path / "folder.png")
    page.locator("nav.pages a[rel=next]").click()
    page.wait_for_url("**/?path=many/&page=2#files")
    names = page.locator("#files tbody td.name > a").all_inner_texts()
    assert names[0] == "f0999.txt" and names[-1] == "f1199.txt" and len(names) == 201
    assert "Page 2 of 2" in page.inner_text("nav.pages")
    size = page.locator("#files tr", has=page.locator("a:text-is('f1023.txt')")).locator(".size")
    assert (size.inner_text(), size.get_attribute("title")) == ("1.0 KiB", "1,024 bytes")
    page.locator("nav.pages a[rel=prev]").click()
    page.wait_for_url("**/?path=many/&page=1#files")
    crumbs.first.click()
    page.wait_for_url("**/#files")
    assert "nested/" in page.locator("#files tbody td.name > a").all_inner_texts()


def test_no_accessibility_violations(site: tuple[Server, str], context: BrowserContext,
                                     tmp_path: Path) -> None:
    page = open_page(site, context)
    assert audit(page) == []
    c = card(page)
    c.locator("summary:text-is('Choose rows')").click()
    add_filter(c, "customer", "is one of")
    add_filter(c, "created_at", "equals")
    add_filter(c, "paid", "is")
    c.locator("details.columns summary").click()
    if page.locator("#files details.sha").count():
        page.locator("#files details.sha summary").first.click()
    shot(page, tmp_path, "audited")
    assert audit(page) == []
    page.goto(site[0].url + "/?path=nested/")
    assert audit(page) == []


def test_page_without_javascript_still_downloads(site: tuple[Server, str],
                                                 browser: Browser) -> None:
    server, token = site
    ctx = browser.new_context(accept_downloads=True, java_script_enabled=False,
                              viewport=PHONE)
    try:
        page = ctx.new_page()
        page.goto(server.url + "/")
        sign_in(page, token)
        assert page.locator("button.copy:visible, button.prepare:visible").count() == 0
        with page.expect_download() as info:
            page.locator("article[data-dataset=daily_revenue] a[data-format=csv]").click()
        saved = Path(info.value.path()).read_bytes()
        expected = httpx.get(server.url + "/datasets/daily_revenue.csv", headers=bearer(token))
        assert saved == expected.content
    finally:
        ctx.close()


def test_listing_json_keeps_name_order(site: tuple[Server, str]) -> None:
    """The JSON listing is unchanged: names in order, folders among them."""
    server, token = site
    body = httpx.get(server.url + "/files/many/", params={"limit": 2, "offset": 1199},
                     headers=bearer(token)).json()
    assert [e["name"] for e in body["entries"]] == ["f1199.txt", "zz-folder"]
    assert json.dumps(body)  # plain JSON
