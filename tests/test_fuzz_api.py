"""Fuzzing a real `exporter serve` on loopback: Schemathesis from the app's own OpenAPI
schema, and Hypothesis-made filter query strings for the export routes. Against a
healthy database, no input may get a 5xx, and every refusal is the API's JSON error."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import example, given
from hypothesis import strategies as st
from schemathesis import GenerationMode

from exporter.access.links import LINK_PARAMETERS, split_query
from exporter.exports.operators import NAMES as OPERATORS
from tests.fuzzing import (
    HUGE,
    OPERATION,
    SERVER,
    hostile_text,
    huge_numbers,
    odd_encoded,
    spellings,
)
from tests.support import Server, raw_request
from tests.test_access import CLOSED, new_token

# The demo table's columns (exporter/exports/demo.py).
ORDERS_COLUMNS = ["id", "customer", "amount", "created_at", "updated_at", "ship_date", "paid",
                  "order_uuid", "details", "tags", "note"]
# Real targets mixed with random ones, so the fuzzer gets past the 404s into the code behind.
DATASET_NAMES = ["orders.csv", "orders.ndjson", "orders", "daily_revenue.csv",
                 "daily_revenue.ndjson", "orders.json", "orders.csv.csv"]
FILE_PATHS = ["README.txt", "nested/", "nested/data.json", "", "nested", "outside-link.txt",
              "inside-link.txt", "fifo", "loop", ".hidden.txt"]
EXTENSIONS = ["csv", "ndjson", "json"]
TIMEOUT = 30


def operations() -> list[tuple[str, GenerationMode]]:
    """Every operation of the schema, as Schemathesis labels them ("GET /datasets/{name}"),
    with valid inputs and, where it takes any, with invalid ones."""
    from exporter.app import create_app
    from exporter.config import Settings

    # The schema is a property of the routes: no database is needed to build it.
    app = create_app(Settings(database_url="postgresql+asyncpg://unused@127.0.0.1/unused"))
    paths = app.openapi()["paths"]
    cases = []
    for path, methods in paths.items():
        # Sorted: a route's methods are a set, whose order changes from one process to
        # the next, and pytest-xdist's workers must all collect the same tests in order.
        for method, operation in sorted(methods.items()):
            label = f"{method.upper()} {path}"
            cases.append((label, GenerationMode.POSITIVE))
            # A path segment is any string: only other inputs can be invalid.
            if operation.get("requestBody") or any(
                p["in"] != "path" for p in operation.get("parameters", [])
            ):
                cases.append((label, GenerationMode.NEGATIVE))
    return cases


OPERATIONS = operations()


@pytest.fixture(scope="module")
def closed(database_url: str, logs_dir: Path, files_root: Path) -> Iterator[Server]:
    """A server open to nobody: what the fuzzer reaches there, it reaches with a token."""
    with Server(database_url, logs_dir / "fuzz-closed.log",
                {"EXPORTER_FILES_ROOT": str(files_root), **CLOSED}) as s:
        yield s


@pytest.fixture(scope="module")
def admin_token(database_url: str) -> str:
    suffix = os.urandom(4).hex()
    return new_token(database_url, f"fuzz-admin-{suffix}", "admin", "datasets:*", "files:*")


def assert_answer(response: Any, method: str) -> None:
    """No 5xx; a refusal carries the API's JSON error, with the same status."""
    status = response.status_code
    assert status < 500, (status, response.text[:2000])
    if status >= 400 and method != "HEAD":
        body = response.json()
        assert body["error"]["status"] == status, body
        assert body["error"]["message"], body
        # PostgREST's fields, which its clients read, say the same.
        assert body["message"] == body["error"]["message"] and body["code"], body


def case_strategy(schema: Any, label: str, mode: GenerationMode) -> st.SearchStrategy[Any]:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    if label.endswith("/datasets/{name}"):
        names = st.one_of(st.sampled_from(DATASET_NAMES), hostile_text())
        return names.flatmap(
            lambda n: operation.as_strategy(generation_mode=mode, path_parameters={"name": n}))
    if "{path}" in label:
        paths = st.one_of(st.sampled_from(FILE_PATHS), hostile_text())
        return paths.flatmap(
            lambda p: operation.as_strategy(generation_mode=mode, path_parameters={"path": p}))
    if "{extension}" in label:
        extensions = st.one_of(st.sampled_from(EXTENSIONS), hostile_text())
        return extensions.flatmap(lambda e: operation.as_strategy(
            generation_mode=mode, path_parameters={"extension": e}))
    return operation.as_strategy(generation_mode=mode)  # type: ignore[no-any-return]


def run_schemathesis(server: Server, label: str, mode: GenerationMode,
                     headers: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=TIMEOUT)
    method = label.split(" ", 1)[0]

    @OPERATION
    @given(case=case_strategy(schema, label, mode))
    def fuzz(case: Any) -> None:
        response = case.call(base_url=server.url, headers=headers, timeout=TIMEOUT)
        assert_answer(response, method)

    fuzz()


@pytest.mark.parametrize(("label", "mode"), OPERATIONS)
def test_schemathesis_open_server_no_5xx(server: Server, label: str,
                                         mode: GenerationMode) -> None:
    run_schemathesis(server, label, mode, {})


@pytest.mark.parametrize(("label", "mode"), OPERATIONS)
def test_schemathesis_closed_server_with_admin_token_no_5xx(
    closed: Server, admin_token: str, label: str, mode: GenerationMode
) -> None:
    if label.startswith("DELETE /tokens/"):
        # Revoking what the fuzzer names could revoke another test's token by chance.
        pytest.skip("revocation is tested in test_access.py")
    run_schemathesis(closed, label, mode, {"Authorization": f"Bearer {admin_token}"})


# -- filter query strings for /datasets/{name}.{ext}, made here -------------------------

def filter_value() -> st.SearchStrategy[str]:
    scalar = st.one_of(hostile_text(), huge_numbers(),
                       st.sampled_from(["", "null", "true", "2026-01-01", "2026-13-45",
                                        "infinity", "-infinity", "epoch", "1e308", "{}", "[]",
                                        "{a,b}", '{"a":1}', "00000000-0000-0000-0000-000000000000",
                                        "it's", '"quoted"', "a,b", "(x)", "*", "%", "\\"]))
    listed = st.lists(scalar, max_size=5).map(lambda v: "(" + ",".join(v) + ")")
    quoted = st.lists(scalar, max_size=5).map(lambda v: "(" + ",".join(
        '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"' for x in v) + ")")
    return st.one_of(scalar, listed, quoted)


def export_params() -> st.SearchStrategy[list[tuple[str, str]]]:
    condition = st.builds(
        lambda neg, op, value: ("not." if neg else "") + f"{op}.{value}",
        st.booleans(), st.sampled_from(OPERATORS), filter_value(),
    )
    filters = st.lists(st.tuples(st.sampled_from(ORDERS_COLUMNS), condition), max_size=4)
    extras = st.lists(st.one_of(
        st.tuples(st.just("select"), st.lists(st.sampled_from(ORDERS_COLUMNS), min_size=1,
                                              max_size=4).map(",".join)),
        st.tuples(st.just("order"), st.sampled_from(ORDERS_COLUMNS).map(lambda c: c + ".desc")),
        st.tuples(st.sampled_from(["limit", "offset"]), huge_numbers()),
    ), max_size=2)
    # Most requests ask for few rows, so that the whole body is read quickly.
    limit = st.sampled_from([[("limit", "5")], [("limit", "5")], [("limit", "5")], []])
    return st.builds(lambda f, e, lim: f + e + lim, filters, extras, limit)


@SERVER
@given(st.sampled_from(["orders.csv", "orders.ndjson", "orders.tsv"]), export_params())
@example("orders.csv", [("amount", "eq." + HUGE)])
@example("orders.csv", [("limit", HUGE)])
@example("orders.csv", [("paid", "is.true"), ("tags", 'in.("with, comma","quote\\"d")')])
@example("orders.ndjson", [("created_at", "gt.2026-01-01T00:00:00+99:99")])
@example("orders.csv", [("customer", "like.*\u00e9*"), ("note", "ilike.*'*")])
def test_hypothesis_filters_on_exports_no_5xx(server: Server, name: str,
                                              params: list[tuple[str, str]]) -> None:
    # A connection of its own: after a 500 uvicorn closes the connection, and a shared
    # one would report the next example as a reset instead.
    response = httpx.get(f"{server.url}/datasets/{name}", params=params, timeout=TIMEOUT)
    assert_answer(response, "GET")
    if response.status_code == 200:
        # The whole body arrived (httpx raises on a broken chunked body) and it is rows.
        assert response.headers["content-type"].startswith(("text/csv", "application/x-ndjson",
                                                            "text/tab-separated-values"))


# -- signed links' own parameters with control bytes and odd encodings (issue 21) ----------

LINKED_PATHS = ["/files/README.txt", "/datasets/orders.csv", "/files/", "/datasets", "/",
                "/exports", "/downloads", "/tokens"]
SIGNED = "~expires=1999999999&~signature=" + "A" * 43


def link_queries() -> st.SearchStrategy[str]:
    names = st.one_of(*(spellings(name) for name in LINK_PARAMETERS), odd_encoded(4))
    pairs = st.lists(st.tuples(names, odd_encoded()), min_size=1, max_size=4)
    return pairs.map(lambda p: "&".join(f"{k}={v}" for k, v in p))


@SERVER
@given(st.sampled_from(LINKED_PATHS), link_queries())
@example("/files/x%1b[31mRED%1b[0m", f"~by=%00&{SIGNED}")  # issue 21: was a 502
@example("/datasets/orders.csv", f"~by=a%00b&{SIGNED}")
@example("/files/README.txt", f"~by=%FF%C0%AE&{SIGNED}")
@example("/files/README.txt", f"~by={'x' * 5000}&{SIGNED}")
@example("/files/README.txt", "%7Eby=%C2%9B&~sig%6Eature=" + "A" * 43 + "&~expires=1%00")
def test_hypothesis_link_parameters_no_5xx(closed: Server, path: str, query: str) -> None:
    # The request line as made, not as a client would re-encode it.
    r = raw_request(closed.url, f"GET {path}?{query} HTTP/1.1", timeout=TIMEOUT)
    assert r.status < 500, (r.status, r.body[:2000])
    if split_query(query)[1]:
        # A link that cannot be one (no signature is valid here): refused, in one way.
        assert r.status == 403, (r.status, r.body[:2000])
    elif r.status >= 400:
        assert json.loads(r.body)["error"]["status"] == r.status
