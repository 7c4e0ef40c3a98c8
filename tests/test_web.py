"""The page's cookie and CORS over plain HTTP: what a browser relies on, header by header.

tests/test_browser.py drives the same paths in Chromium."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest

from tests.support import Server, wait_until
from tests.test_access import CLOSED, bearer, new_token

APP = "http://127.0.0.1:5173"  # a listed origin: nothing listens there, only the header matters
OTHER = "http://127.0.0.1:5174"


@pytest.fixture(scope="module")
def token(database_url: str) -> str:
    return new_token(database_url, f"web-{os.urandom(3).hex()}", "datasets:orders", "files:*")


@pytest.fixture(scope="module")
def closed(make_module_server: type[Server]) -> Server:
    """One closed server for the module: its tests change tokens and cookies, not it."""
    return make_module_server(CLOSED).start()


@pytest.fixture(scope="module")
def cors_server(make_module_server: type[Server]) -> Iterator[Server]:
    yield make_module_server({**CLOSED, "EXPORTER_CORS_ORIGINS": json.dumps([APP]),
                       "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "1",
                       # the 429 below comes at once instead of after the usual wait
                       "EXPORTER_LIMIT_WAIT": "0"}).start()


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


def test_preflight_for_get_with_authorization_and_range(cors_server: Server) -> None:
    r = httpx.options(cors_server.url + "/files/README.txt", headers={
        "Origin": APP, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization,range,if-range"})
    assert r.status_code == 200
    h = cors_headers(r)
    assert h["access-control-allow-origin"] == APP
    assert {"GET", "HEAD"} <= set(h["access-control-allow-methods"].split(", "))
    allowed = {x.strip().lower() for x in h["access-control-allow-headers"].split(",")}
    assert {"authorization", "range", "if-range"} <= allowed
    assert "access-control-allow-credentials" not in h

    refused = httpx.options(cors_server.url + "/files/README.txt", headers={
        "Origin": OTHER, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert refused.status_code >= 400 and cors_headers(refused) == {}


def test_answers_and_errors_carry_cors_headers(cors_server: Server, token: str) -> None:
    url = cors_server.url + "/datasets/orders.csv?limit=1"
    ok = httpx.get(url, headers={**bearer(token), "Origin": APP})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == APP
    exposed = {x.strip() for x in ok.headers["access-control-expose-headers"].split(",")}
    assert {"Content-Disposition", "Content-Range", "Content-Length", "ETag", "Repr-Digest",
            "Accept-Ranges", "Last-Modified"} <= exposed
    assert "Origin" in ok.headers["vary"] and "Accept" in ok.headers["vary"]

    for headers, status in [({}, 401), (bearer(token), 403)]:
        r = httpx.get(cors_server.url + "/datasets/daily_revenue.csv",
                      headers={**headers, "Origin": APP})
        assert r.status_code == status
        assert r.headers["access-control-allow-origin"] == APP
        assert r.json()["error"]["status"] == status

    # The one download slot taken by a file that is not read, the next one gets 429.
    with httpx.stream("GET", cors_server.url + "/files/large.bin", headers=bearer(token)) as held:
        assert held.status_code == 200
        busy = httpx.get(url, headers={**bearer(token), "Origin": APP})
        assert busy.status_code == 429 and busy.headers["retry-after"]
        assert busy.headers["access-control-allow-origin"] == APP

    other = httpx.get(url, headers={**bearer(token), "Origin": OTHER})
    assert other.status_code == 200 and cors_headers(other) == {}
    assert "Origin" in other.headers["vary"]


def test_no_cors_headers_without_the_setting(closed: Server, token: str) -> None:
    server = closed
    r = httpx.get(server.url + "/datasets/orders.csv?limit=1",
                  headers={**bearer(token), "Origin": APP})
    assert r.status_code == 200 and cors_headers(r) == {}


def test_cookie_is_a_credential_for_reads_only(closed: Server, token: str) -> None:
    server = closed
    cookie = {"Cookie": f"exporter_token={token}"}
    assert httpx.get(server.url + "/datasets/orders.csv?limit=1", headers=cookie
                     ).status_code == 200
    assert httpx.head(server.url + "/files/README.txt", headers=cookie).status_code == 200
    # Not for anything that changes state: a form on another site cannot use it.
    r = httpx.post(server.url + "/links", headers=cookie,
                   json={"url": "/datasets/orders.csv", "expires_in": "15m"})
    assert r.status_code == 401
    # A bad cookie: 401 from the API, the sign-in form on the page.
    bad = {"Cookie": "exporter_token=exp_" + "x" * 43}
    r = httpx.get(server.url + "/datasets/orders.csv", headers=bad)
    assert r.status_code == 401 and "cookie" in r.json()["error"]["message"]
    page = httpx.get(server.url + "/", headers=bad)
    assert page.status_code == 200 and 'id="sign-in"' in page.text
    assert page.headers["cache-control"] == "no-store"
    # The Authorization header wins over the cookie.
    r = httpx.get(server.url + "/datasets/orders.csv?limit=1",
                  headers={**bad, **bearer(token)})
    assert r.status_code == 200


def test_cookie_deletes_a_prepared_download_from_the_page_only(closed: Server,
                                                               token: str) -> None:
    """The page cancels and deletes its prepared downloads with its cookie: a DELETE of
    /exports/ID whose Origin is the server's own. Without Origin, from another origin,
    or on another path (a token), the cookie is no credential."""
    server = closed
    started = httpx.get(server.url + "/datasets/orders.csv?limit=3", timeout=30,
                        headers={**bearer(token), "Prefer": "respond-async"})
    assert started.status_code == 202, started.text
    where = f"{server.url}/exports/{started.json()['id']}"
    # Finished first: a DELETE of a running export cancels it (then 410, not 404).
    assert wait_until(lambda: httpx.get(where, headers=bearer(token)).status_code == 200, 30)
    cookie = {"Cookie": f"exporter_token={token}"}
    for origin in (None, "http://evil.example", server.url.replace("127.0.0.1", "localhost")):
        headers = {**cookie, **({"Origin": origin} if origin else {})}
        refused = httpx.delete(where, headers=headers)
        assert refused.status_code in (401, 403), (origin, refused.status_code, refused.text)
        assert httpx.get(where, headers=bearer(token)).status_code == 200
    assert httpx.delete(f"{server.url}/tokens/nobody", headers={**cookie, "Origin": server.url}
                        ).status_code == 401
    done = httpx.delete(where, headers={**cookie, "Origin": server.url})
    assert done.status_code == 204, done.text
    assert httpx.get(where, headers=bearer(token)).status_code == 404


def test_sign_in_sets_and_sign_out_clears_the_cookie(closed: Server,
                                                     token: str) -> None:
    server = closed
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(server.url + "/session", content=f"token={token}",
                   headers={**form, "Origin": server.url})
    assert r.status_code == 303 and r.headers["location"] == "/"
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith(f"exporter_token={token};")
    attributes = {a.strip().lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "path=/", "samesite=strict"} <= attributes
    assert "secure" not in attributes  # plain http on loopback: a Secure cookie would not stick

    wrong = httpx.post(server.url + "/session", content="token=exp_nope", headers=form)
    assert wrong.status_code == 303 and wrong.headers["location"] == "/?signin=failed"
    assert "set-cookie" not in wrong.headers

    # Another site's form may not sign a visitor in (with a token of its choosing).
    cross = httpx.post(server.url + "/session", content=f"token={token}",
                       headers={**form, "Origin": OTHER})
    assert cross.status_code == 403 and "set-cookie" not in cross.headers

    out = httpx.post(server.url + "/session/end", headers={"Origin": server.url})
    assert out.status_code == 303
    assert out.headers["set-cookie"].startswith('exporter_token="";')
    assert "max-age=0" in out.headers["set-cookie"].lower()

    too_big = httpx.post(server.url + "/session", content="token=" + "x" * 5000, headers=form)
    assert too_big.status_code == 413
