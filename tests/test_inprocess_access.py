"""Scopes against targets, and CORS, as matrices in process (tests/inprocess.py): the app
with closed settings (anonymous clients get nothing), tokens made through the app's own
TokenStore, every request through httpx's ASGITransport. Real clients (curl, wget), signed
links and limits over a real server stay in tests/test_access.py and tests/test_web.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.config import Settings
from tests.inprocess import InProcess
from tests.test_access import SCOPES  # the same tokens as through a real server

APP_ORIGIN = "https://ui.example.com"


@pytest.fixture(scope="module")
def app(database_url: str, files_root: Path) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, files_root=files_root, public_datasets=[],
                        public_files=[], cors_origins=[APP_ORIGIN])
    with InProcess(settings) as running:
        yield running


@pytest.fixture(scope="module")
def tokens(app: InProcess) -> dict[str, str]:
    suffix = os.urandom(3).hex()
    return {key: app.call(lambda st, key=key, scopes=scopes:  # type: ignore[misc]
                          st.tokens.create(f"inproc-{key}-{suffix}", scopes, None))
            for key, scopes in SCOPES.items()}


TARGETS = ["/datasets/orders.csv?limit=1", "/datasets/daily_revenue.ndjson?limit=1",
           "/datasets/no-such-thing.csv", "/datasets", "/files/README.txt",
           "/files/nested/data.json", "/files/nested/", "/files/", "/files/no/such/file",
           "/downloads", "/tokens"]
# The status of each target for each token. A token whose scopes do not cover a name does
# not learn whether it exists (403, not 404); the lists (/datasets, /files/) answer
# everyone who may read something, with only what they may read.
EXPECTED = {
    "all-data": [200, 200, 404, 200, 403, 403, 403, 403, 403, 403, 403],
    "orders-only": [200, 403, 403, 200, 403, 403, 403, 403, 403, 403, 403],
    "all-files": [403, 403, 403, 200, 200, 200, 200, 200, 404, 403, 403],
    "nested-only": [403, 403, 403, 200, 403, 200, 200, 200, 403, 403, 403],
    "boss": [200, 200, 404, 200, 200, 200, 200, 200, 404, 200, 200],
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_each_scope_against_each_target(app: InProcess, tokens: dict[str, str],
                                        key: str) -> None:
    got = []
    for path in TARGETS:
        r = app.get(path, headers={"Authorization": f"Bearer {tokens[key]}"})
        got.append(r.status_code)
        if r.status_code >= 400:
            assert r.json()["error"]["status"] == r.status_code, path
            assert "www-authenticate" not in r.headers, path
    assert dict(zip(TARGETS, got, strict=True)) == dict(zip(TARGETS, EXPECTED[key],
                                                             strict=True))


@pytest.mark.parametrize("path", TARGETS)
def test_anonymous_clients_get_401_with_both_challenges(app: InProcess, path: str) -> None:
    r = app.get(path)
    assert r.status_code == 401
    assert r.headers.get_list("www-authenticate") == [
        'Bearer realm="exporter"', 'Basic realm="exporter", charset="UTF-8"']
    assert r.json()["error"]["status"] == 401


@pytest.mark.parametrize("authorization", [
    "Bearer exp_wrongwrongwrongwrongwrongwrongwrongwrongwro",
    "Bearer", "Basic !!!notbase64", "Basic eDp4",  # x:x
    "Digest username=x", "Bearer " + "x" * 5000,
])
def test_bad_credentials_get_401(app: InProcess, authorization: str) -> None:
    r = app.get("/datasets/orders.csv", headers={"Authorization": authorization})
    assert r.status_code == 401
    assert len(r.headers.get_list("www-authenticate")) == 2


def test_basic_with_the_token_as_password(app: InProcess, tokens: dict[str, str]) -> None:
    r = app.get("/datasets/orders.csv?limit=1", auth=("anyone", tokens["orders-only"]))
    assert r.status_code == 200
    assert app.get("/datasets/orders.csv", auth=("anyone", "exp_nope")).status_code == 401


def test_healthz_needs_no_token(app: InProcess) -> None:
    assert app.get("/healthz").status_code == 200


# --- CORS -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "token", "status"), [
    ("/datasets/orders.csv?limit=1", "orders-only", 200),
    ("/datasets/orders.csv?limit=1", None, 401),
    ("/files/README.txt", "orders-only", 403),
    ("/datasets/orders.csv?id=gt.x", "orders-only", 400),
    ("/datasets/orders", "orders-only", 200),
])
def test_a_listed_origin_may_read_every_answer(
    app: InProcess, tokens: dict[str, str], path: str, token: str | None, status: int
) -> None:
    headers = {"Origin": APP_ORIGIN}
    if token:
        headers["Authorization"] = f"Bearer {tokens[token]}"
    r = app.get(path, headers=headers)
    assert r.status_code == status
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "content-disposition" in r.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers


def test_an_origin_not_listed_gets_no_cors_header(app: InProcess, tokens: dict[str, str]) -> None:
    r = app.get("/datasets/orders.csv?limit=1", headers={
        "Origin": "https://evil.example.com", "Authorization": f"Bearer {tokens['boss']}"})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.startswith("access-control-")]
    assert "origin" in r.headers["vary"].lower()


@pytest.mark.parametrize(("origin", "allowed"), [
    (APP_ORIGIN, True), ("https://evil.example.com", False), ("null", False),
])
def test_preflight(app: InProcess, origin: str, allowed: bool) -> None:
    r = app.options("/files/README.txt", headers={
        "Origin": origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, range"})
    if allowed:
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        assert {"authorization", "range"} <= {
            h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    else:
        assert r.status_code in (401, 405)
        assert "access-control-allow-origin" not in r.headers
