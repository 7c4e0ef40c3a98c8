"""Hostile paths through real HTTP, as raw request lines no client normalises."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SECRET
from tests.support import Server, raw_request

NOT_FOUND, BAD = {404}, {400}
EITHER = {400, 404}

# (request target, statuses allowed). Nothing here may be 500 or leak the secret.
CORPUS: list[tuple[str, set[int]]] = [
    ("/files/../secret.txt", EITHER),
    ("/files/../../../../../../etc/passwd", EITHER),
    ("/files/..%2fsecret.txt", NOT_FOUND),
    ("/files/..%2Fsecret.txt", NOT_FOUND),
    ("/files/%2e%2e/secret.txt", NOT_FOUND),
    ("/files/%2E%2E/secret.txt", NOT_FOUND),
    ("/files/%2e%2e%2fsecret.txt", NOT_FOUND),
    ("/files/.%2e/secret.txt", NOT_FOUND),
    ("/files/%2e./secret.txt", NOT_FOUND),
    ("/files/%252e%252e%252fsecret.txt", NOT_FOUND),
    ("/files/..%252fsecret.txt", NOT_FOUND),
    ("/files/%252e%252e/secret.txt", NOT_FOUND),
    ("/files/%25252e%25252e%25252fsecret.txt", NOT_FOUND),
    ("/files/%%32%65%%32%65/secret.txt", NOT_FOUND),
    ("/files/nested/../../secret.txt", NOT_FOUND),
    ("/files/nested/%2e%2e/%2e%2e/secret.txt", NOT_FOUND),
    ("/files/nested/..%2f..%2fsecret.txt", NOT_FOUND),
    ("/files/nested/deeper/../../../secret.txt", NOT_FOUND),
    ("/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", NOT_FOUND),
    ("/files/....//....//etc/passwd", NOT_FOUND),
    ("/files/..;/secret.txt", NOT_FOUND),
    ("/files/;/../secret.txt", NOT_FOUND),
    ("/files/large.bin/../secret.txt", NOT_FOUND),
    ("/files/..\\secret.txt", BAD),
    ("/files/..%5csecret.txt", BAD),
    ("/files/%5c..%5csecret.txt", BAD),
    ("/files/%2e%2e%5csecret.txt", BAD),
    ("/files/C:\\Windows\\win.ini", BAD),
    ("/files/C:/Windows/win.ini", NOT_FOUND),
    ("/files//etc/passwd", NOT_FOUND),
    ("/files/%2fetc%2fpasswd", NOT_FOUND),
    ("/files/%2Fetc/passwd", NOT_FOUND),
    ("/files/nested//data.json", NOT_FOUND),
    ("/files/nested/%2f%2f", NOT_FOUND),
    ("/files/README.txt%00.png", BAD),
    ("/files/README.txt%00", BAD),
    ("/files/%00", BAD),
    ("/files/..%00/secret.txt", BAD),
    ("/files/nested%00/data.json", BAD),
    ("/files/%0d%0aSet-Cookie:%20x=1", EITHER),  # the router finds no route: 404
    ("/files/%0a", BAD),
    ("/files/%7f", BAD),
    ("/files/" + "x" * 256, BAD),
    ("/files/" + "%C3%A9" * 128, BAD),  # 256 bytes once decoded
    ("/files/" + "a/" * 2100 + "b", BAD),
    ("/files/%c0%ae%c0%ae/secret.txt", NOT_FOUND),  # overlong UTF-8 dots
    ("/files/..%c0%afsecret.txt", NOT_FOUND),
    ("/files/%e0%80%ae%e0%80%ae/secret.txt", NOT_FOUND),
    ("/files/%ef%bc%8e%ef%bc%8e/secret.txt", NOT_FOUND),  # full-width dots
    ("/files/..%u2216secret.txt", NOT_FOUND),
    ("/files/%C3%28", NOT_FOUND),
    ("/files/%ZZ", NOT_FOUND),
    ("/files/.", NOT_FOUND),
    ("/files/..", NOT_FOUND),
    ("/files/%2e", NOT_FOUND),
    ("/files/./README.txt", NOT_FOUND),
    ("/files/README.txt/", NOT_FOUND),
    ("/files/README.txt/.", NOT_FOUND),
    ("/files/README.TXT", NOT_FOUND),
    ("/files/README.txt%20", NOT_FOUND),
    ("/files/README.txt::$DATA", NOT_FOUND),
    ("/files/outside-link.txt", NOT_FOUND),
    ("/files/relative-out.txt", NOT_FOUND),
    ("/files/outside-dir/secret.txt", NOT_FOUND),
    ("/files/outside-dir/", NOT_FOUND),
    ("/files/etc-link/passwd", NOT_FOUND),
    ("/files/etc-link/", NOT_FOUND),
    ("/files/dev-null-link", NOT_FOUND),
    ("/files/loop", NOT_FOUND),
    ("/files/fifo", NOT_FOUND),
    ("/files/sock", NOT_FOUND),
    ("/files/null-device", NOT_FOUND),
    ("/files/.hidden.txt", NOT_FOUND),
    ("/files/%2ehidden.txt", NOT_FOUND),
    ("/files/.git/config", NOT_FOUND),
    ("/files/.git/", NOT_FOUND),
    ("/files/nested/.secret", NOT_FOUND),
    ("/files/visible-link-to-hidden", NOT_FOUND),
    ("/files/...", NOT_FOUND),
    ("/files/%252F..%252Fsecret.txt", NOT_FOUND),
    ("/files/nested/%252e%252e/%252e%252e/secret.txt", NOT_FOUND),
    ("../secret.txt", {400, 404}),
    ("/files/../files/../secret.txt", EITHER),
    ("http://127.0.0.1/files/../secret.txt", {400, 404}),
]

# Links that stay inside the root are fine.
ALLOWED = [("/files/inside-link.txt", b"Demo files"), ("/files/nested/up-link.txt", b"Demo files")]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 60


@pytest.mark.parametrize(("target", "allowed"), CORPUS, ids=[t[:60] for t, _ in CORPUS])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_hostile_path(server: Server, method: str, target: str, allowed: set[int]) -> None:
    r = raw_request(server.url, f"{method} {target} HTTP/1.1")
    assert r.status in allowed, (r.status, r.body[:300])
    assert SECRET not in r.body and b"root:" not in r.body
    if method == "GET" and target.startswith("/files/"):
        error = json.loads(r.body)["error"]  # a clear JSON error, from the app itself
        assert error["status"] == r.status


@pytest.mark.parametrize(("target", "start"), ALLOWED)
def test_links_inside_the_root(server: Server, target: str, start: bytes) -> None:
    r = raw_request(server.url, f"GET {target} HTTP/1.1")
    assert r.status == 200 and r.body.startswith(start)


def test_hidden_files_can_be_allowed(make_server: type[Server]) -> None:
    s = make_server({"EXPORTER_SERVE_HIDDEN": "true"}).start()
    assert raw_request(s.url, "GET /files/.hidden.txt HTTP/1.1").body == SECRET
    # Still never outside the root.
    assert raw_request(s.url, "GET /files/outside-link.txt HTTP/1.1").status == 404
    assert raw_request(s.url, "GET /files/%2e%2e/secret.txt HTTP/1.1").status == 404
