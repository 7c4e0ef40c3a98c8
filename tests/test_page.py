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
from tests.test_inprocess_page import HOSTILE_VIEW, arguments, quoted_ident

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
    c.locator("details.token-for summary").click()
    c.locator("button[aria-label='Copy the command that makes a token for orders']").click()
    assert clipboard() == ("exporter token create --name YOUR-NAME --scope datasets:orders"
                           " --expires 90d")

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


# A value a shell would read, for a filter of the hostile view.
HOSTILE_VALUE = "it's \"$(id)\" `id`; &|*"


@pytest.mark.needs("curl")
def test_copied_commands_do_what_they_say(site: tuple[Server, str], context: BrowserContext,
                                          database_url: str, tmp_path: Path) -> None:
    """A view named with quotes and $( ) appeared raw in the token hint's command. Every
    copied command now hands its program the arguments it shows (the program replaced by
    printf), and the copied curl, run by sh, downloads what the builder chose."""
    server, _ = site
    view = f"exports.{quoted_ident(HOSTILE_VIEW)}"
    hostile = HOSTILE_VALUE.replace("'", "''")
    # In a thread: Playwright's sync API holds an event loop in this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run_sql, database_url, f"CREATE VIEW {view} AS SELECT 1 AS id,"
                    f" 'plain'::text AS note UNION ALL SELECT 2, '{hostile}'").result(60)
    try:
        token = new_token(database_url, f"hostile-{os.urandom(3).hex()}",
                          f"datasets:{HOSTILE_VIEW}")
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page = open_page((server, token), context)

        def copied(button: Locator) -> str:
            button.click()
            text: str = page.evaluate("navigator.clipboard.readText()")
            return text

        c = page.locator("article[data-dataset]")
        assert c.get_attribute("data-dataset") == HOSTILE_VIEW
        # The card's own token command (issue 22 moved it from the page's token box).
        c.locator("summary:text-is('No token for these commands?')").click()
        assert arguments(copied(c.locator(".token-for button.copy"))) == ("exporter", [
            "token", "create", "--name", "YOUR-NAME", "--scope", f"datasets:{HOSTILE_VIEW}",
            "--expires", "90d"])
        c.locator("summary:text-is('Choose rows')").click()
        add_filter(c, "note", "equals").locator(".value").fill(HOSTILE_VALUE)
        link = c.locator("a.export").first.get_attribute("href")
        assert link is not None and "note=eq." in link
        link = httpx.URL(server.url).join(link)
        curl = copied(c.locator(".commands button.copy").nth(0))
        wget = copied(c.locator(".commands button.copy").nth(1))
        header = "Authorization: Bearer exp_secret"
        secret = {"EXPORTER_TOKEN": "exp_secret"}
        assert arguments(curl, secret) == ("curl", ["-fOJ", "-H", header, str(link)])
        assert arguments(wget, secret) == (
            "wget", ["--content-disposition", f"--header={header}", str(link)])
        done = subprocess.run(["sh", "-c", curl], cwd=tmp_path, capture_output=True,
                              timeout=60, env={**os.environ, "EXPORTER_TOKEN": token})
        assert done.returncode == 0, done.stderr
        [saved] = [f for f in tmp_path.iterdir() if f.suffix == ".csv"]
        assert csv_rows(saved.read_bytes()) == [["id", "note"], ["2", HOSTILE_VALUE]]
    finally:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(run_sql, database_url, f"DROP VIEW IF EXISTS {view}").result(60)


def test_prepared_download_shows_progress_then_the_file(
        site: tuple[Server, str], context: BrowserContext, tmp_path: Path,
        database_url: str) -> None:
    page = open_page(site, context)
    c = card(page, SLOW)
    prepare = c.locator("button.prepare")
    assert prepare.inner_text() == "Prepare CSV download"
    prepare.click()
    # Said beside the button, and shown under it: in the card it was asked from.
    status = c.locator(".prepare-status")
    page.wait_for_function("e => e.textContent.startsWith('Preparing')",
                           arg=status.element_handle())
    item = c.locator("li.prepared-item").first
    item.locator("progress").wait_for()
    assert page.locator("#prepared").count() == 0
    # Rows and a percent while it runs (the estimate is the planner's).
    assert wait_until(lambda: re.search(r"[1-9][\d,]* rows \(\d+%\)", item.inner_text())
                      is not None, 20), item.inner_text()
    shot(page, tmp_path, "preparing")
    # Resume copies of the same principal's streamed downloads, newer than it, do not
    # push it off the page's list.
    server, token = site
    for i in range(21):
        r = httpx.get(f"{server.url}/datasets/orders.csv?limit={i + 1}", timeout=30,
                      headers={"Authorization": f"Bearer {token}",
                               "Accept-Encoding": "identity"})
        assert r.status_code == 200 and "content-location" in r.headers
    # A reload lists it again, from GET /exports.
    page.reload()
    item = card(page, SLOW).locator("li.prepared-item").first
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
    # Its owner deletes it from the page: gone from the page, and from the server.
    export_id = item.get_attribute("data-id")
    item.locator(f"button[aria-label='Delete {name}']").click()
    item.wait_for(state="detached")
    gone = httpx.get(f"{server.url}/exports/{export_id}", headers=bearer(token), timeout=30)
    assert gone.status_code == 404, gone.text
    page.reload()
    assert card(page, SLOW).locator(f"li.prepared-item[data-id='{export_id}']").count() == 0


def test_a_prepared_download_is_cancelled_by_its_owner_and_others_are_not_listed(
        site: tuple[Server, str], context: BrowserContext, tmp_path: Path,
        database_url: str) -> None:
    """An admin (the demo token is one) sees only the prepared downloads they asked
    for, not everyone's; a running one has Cancel, which cancels it on the server."""
    server, _ = site
    admin = new_token(database_url, f"boss-{os.urandom(3).hex()}", "admin")
    other = new_token(database_url, f"other-{os.urandom(3).hex()}", "datasets:*")
    theirs = httpx.get(f"{server.url}/datasets/orders.csv?limit=5", timeout=30,
                       headers={**bearer(other), "Prefer": "respond-async"})
    assert theirs.status_code == 202, theirs.text
    page = open_page((server, admin), context)
    c = card(page, SLOW)
    c.locator("button.prepare").click()
    item = c.locator("li.prepared-item").first
    item.locator("progress").wait_for()
    export_id = item.get_attribute("data-id")
    item.locator("button:text-is('Cancel')").click()
    item.locator("span.notice.error").wait_for()
    assert item.inner_text().startswith(SLOW) and "cancelled" in item.inner_text()
    shot(page, tmp_path, "cancelled")
    status = httpx.get(f"{server.url}/exports/{export_id}", headers=bearer(admin), timeout=30)
    assert status.json()["status"] == "cancelled", status.text
    page.reload()
    card(page, SLOW).locator(f"li.prepared-item[data-id='{export_id}']").wait_for()
    listed = page.locator("li.prepared-item").evaluate_all("l => l.map(e => e.dataset.id)")
    assert theirs.json()["id"] not in listed and export_id in listed


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
    assert (size.inner_text(), size.get_attribute("title")) == ("100 bytes", "100 bytes")
    crumbs = page.locator("nav.crumbs a")
    assert crumbs.all_inner_texts() == ["All files", "many"]
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
    # At the top, no trail of one crumb; and a size in words, "31 bytes".
    assert page.locator("nav.crumbs").count() == 0
    readme = page.locator("#files tr", has=page.locator("a:text-is('README.txt')"))
    assert readme.locator(".size").inner_text() == "31 bytes"


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


def test_signed_out_sign_in_stays_on_one_line(site: tuple[Server, str],
                                               context: BrowserContext, tmp_path: Path) -> None:
    """Signed out: the form on one line at 1280 px, the field above the button on a
    phone; no request fails (no favicon.ico 404 in the console); the hint names a token."""
    server, _ = site
    context.clear_cookies()  # the context starts signed in: signed out here
    page = context.new_page()
    failed: list[str] = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    page.on("console", lambda m: failed.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/")
    page.wait_for_load_state("networkidle")
    assert failed == []
    assert page.locator("link[rel=icon]").get_attribute("href", timeout=1000)
    field = page.locator("#token").bounding_box()
    button = page.locator("#sign-in button[type=submit]").bounding_box()
    assert field and button
    if (page.viewport_size or {"width": 0})["width"] >= 1280:
        assert abs(field["y"] - button["y"]) < field["height"], (field, button)
        assert button["x"] > field["x"] + field["width"]
    assert "Sign in with a token" in page.inner_text(".empty")
    shot(page, tmp_path, "signed-out")
    assert audit(page) == []


def test_one_format_choice_and_the_token_of_each_card(site: tuple[Server, str],
                                                     context: BrowserContext,
                                                     tmp_path: Path) -> None:
    """One format choice a card, which the download, the commands and the prepared
    download follow; the token box shows the signed-in token as an export line, and
    each card suggests a token for its own dataset; the bar is sticky only while rows
    are chosen, so that it covers no other card."""
    token = site[1]
    page = open_page(site, context)
    c = card(page)
    assert c.locator("select.cmd-format").count() == 1
    visible = c.locator("a.export:visible")
    assert visible.count() == 1 and visible.inner_text() == "Download CSV"
    c.locator("select.cmd-format").select_option("ndjson")
    assert visible.count() == 1 and visible.inner_text() == "Download NDJSON"
    assert (visible.get_attribute("href") or "").endswith("/datasets/orders.ndjson")
    assert "orders.ndjson" in c.locator("pre.curl").inner_text()
    assert c.locator("button.prepare").inner_text() == "Prepare NDJSON download"
    c.locator("select.cmd-format").select_option("xlsx")  # a spreadsheet, streamed too
    assert visible.inner_text() == "Download XLSX"
    assert (visible.get_attribute("href") or "").endswith("/datasets/orders.xlsx")
    assert "orders.xlsx" in c.locator("pre.curl").inner_text()
    c.locator("select.cmd-format").select_option("ndjson")
    # The token itself never (HttpOnly): its name, for a token other than the demo's.
    hint = page.inner_text(".token-hint")
    assert token not in page.content()
    assert re.search(r"the token named page-[0-9a-f]{6} that you signed in with", hint), hint
    for name in ("orders", SLOW):
        assert f"--scope datasets:{name} " in card(page, name).locator(
            "pre.token-cmd").text_content()
    bar = c.locator(".downloads")

    def position(value: str) -> None:  # details' toggle event comes after the click
        page.wait_for_function(f"e => getComputedStyle(e).position === '{value}'",
                               arg=bar.element_handle(), timeout=5000)

    position("static")
    c.locator("summary:text-is('Choose rows')").click()
    position("sticky")
    c.locator("summary:text-is('Choose rows')").click()
    position("static")
    # Scrolled so that a card's bar sits at the bottom of the screen: what follows shows.
    shot(page, tmp_path, "formats")
    assert audit(page) == []
