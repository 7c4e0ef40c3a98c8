"""Bounds on what one client can make the server hold: request heads (size, time),
connections, kept-alive idle connections; forwarded addresses; absurd numbers and dates.

Raw sockets, so that nothing between the test and the server trims or times anything.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Server, audited, peak_rss_bytes, raw_request, reset_peak_rss, wait_until

MiB = 1024 * 1024
HUGE = "9" * 5000  # int() refuses more than 4300 digits


# Servers with the bounds under test, each started once for the module (tests/conftest.py
# keeps the module on one worker) and shared by the tests whose settings agree: a server
# start is a Python start-up and the app's (about 1 s quiet, 10-15 s seen under load).
@pytest.fixture(scope="module")
def timeouts(make_module_server: type[Server]) -> Server:
    """A short header timeout, a long keep-alive, forwarded addresses believed."""
    return make_module_server({
        "EXPORTER_HEADER_TIMEOUT": "2", "EXPORTER_KEEP_ALIVE_TIMEOUT": "30",
        "EXPORTER_FORWARDED_ALLOW_IPS": "127.0.0.1"}).start()


@pytest.fixture(scope="module")
def few_connections(make_module_server: type[Server]) -> Server:
    """A short keep-alive and at most three connections."""
    return make_module_server({"EXPORTER_KEEP_ALIVE_TIMEOUT": "1",
                               "EXPORTER_MAX_CONNECTIONS": "3"}).start()


def connect(server: Server, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send until done or until the server shuts the door (which is what is tested)."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError, TimeoutError):
        sock.sendall(data)


# --- the request head: size --------------------------------------------------------------


def test_a_1_mb_header_gets_431_quickly_and_the_connection_closed(server: Server) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MiB + b"\r\n\r\n"
        sender = threading.Thread(target=send_quietly, args=(sock, head))
        sender.start()
        answer = read_until_closed(sock)  # returns only once the server has closed
        sender.join()
        elapsed = time.monotonic() - started
    assert status_of(answer) == 431, answer[:200]
    assert b"connection: close" in answer.lower()
    assert b"EXPORTER_MAX_HEADER_BYTES" in answer
    assert elapsed < 5
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.needs("curl")
def test_a_1_mb_header_gets_431_curl(server: Server, tmp_path: Path) -> None:
    headers = tmp_path / "headers.txt"
    # curl refuses one header line of 1 MB: ten of 100 KiB.
    headers.write_text("".join(f"X-Big-{i}: " + "a" * (100 * 1024) + "\n" for i in range(10)))
    done = subprocess.run(
        ["curl", "-sS", "-o", str(tmp_path / "body"), "-w", "%{http_code}",
         "-H", f"@{headers}", server.url + "/files/README.txt"],
        capture_output=True, timeout=30, check=False,
    )
    assert done.stdout == b"431", done.stderr
    assert b"EXPORTER_MAX_HEADER_BYTES" in (tmp_path / "body").read_bytes()


def test_the_bound_holds_with_several_workers(make_server: type[Server]) -> None:
    """Workers are spawned processes: the protocol and its settings must reach them."""
    s = make_server({"EXPORTER_MAX_HEADER_BYTES": "8192"})
    s.command += ["--workers", "2"]
    with s:
        assert raw_request(s.url, "GET /healthz HTTP/1.1", {"X-Pad": "a" * 7000}).status == 200
        for _ in range(4):  # whichever worker takes the connection
            r = raw_request(s.url, "GET /healthz HTTP/1.1", {"X-Pad": "a" * 9000})
            assert r.status == 431


def test_a_head_just_under_the_bound_is_served(server: Server) -> None:
    r = raw_request(server.url, "GET /healthz HTTP/1.1", {"X-Pad": "a" * (60 * 1024)})
    assert r.status == 200
    # Pipelined requests whose heads add up to more than the bound are each within it.
    with connect(server) as sock:
        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n"
        sock.sendall(one * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.count(b"HTTP/1.1 200 OK") == 4


def test_four_100_mb_headers_do_not_grow_the_server(timeouts: Server) -> None:
    s = timeouts
    httpx.get(s.url + "/healthz")
    reset_peak_rss(s.pid)  # what the module's other tests made it hold does not count
    before = peak_rss_bytes(s.pid)
    socks = [connect(s) for _ in range(4)]
    try:
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 * 1000 * 1000)
        senders = [threading.Thread(target=send_quietly, args=(sock, head)) for sock in socks]
        for t in senders:
            t.start()
        answers = [read_until_closed(sock) for sock in socks]
        for t in senders:
            t.join(60)
    finally:
        for sock in socks:
            sock.close()
    growth = peak_rss_bytes(s.pid) - before
    assert all(status_of(a) == 431 for a in answers), [a[:100] for a in answers]
    # Before, each connection's header was kept whole: 500 MB more.
    assert growth < 8 * MiB, growth
    assert httpx.get(s.url + "/healthz").status_code == 200


# --- the request head: time --------------------------------------------------------------


def test_a_head_trickled_one_byte_a_second_is_cut_after_the_header_timeout(
        timeouts: Server) -> None:
    s = timeouts
    with connect(s) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        for _ in range(20):
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(1)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        sock.settimeout(10)
        answer += read_until_closed(sock)
        elapsed = time.monotonic() - started
        assert status_of(answer) == 408, answer
        assert b"EXPORTER_HEADER_TIMEOUT" in answer
        assert 1.5 < elapsed < 8  # EXPORTER_HEADER_TIMEOUT=2
        assert httpx.get(s.url + "/healthz").status_code == 200


def test_a_second_head_trickled_on_a_kept_alive_connection_is_cut_too(
        timeouts: Server) -> None:
    with connect(timeouts) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(sock.recv(65536)) == 200
        time.sleep(2.5)  # idle, within the keep-alive timeout: the head timer is not running
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.settimeout(1)
        answer = b""
        for _ in range(20):
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(65536)
            if answer:
                break
            with contextlib.suppress(OSError):
                sock.sendall(b"X")
        sock.settimeout(10)
        answer += read_until_closed(sock)
        assert status_of(answer) == 408, answer
        assert 1.5 < time.monotonic() - started < 8


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
        timeouts: Server) -> None:
    with connect(timeouts) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # nothing was asked: closed without an answer
        assert 1.5 < time.monotonic() - started < 8


def test_the_header_timeout_does_not_cut_a_slow_download(timeouts: Server) -> None:
    """The timer bounds the head only: a response that takes longer is not cut."""
    with connect(timeouts) as sock:
        sock.sendall(b"GET /files/large.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(3)  # the server waits for us to read, well past the header timeout
        answer = read_until_closed(sock)
        assert status_of(answer) == 200
        assert len(answer) > 256 * MiB  # the whole file and its head


def test_the_keep_alive_timeout_closes_idle_connections(few_connections: Server) -> None:
    with connect(few_connections) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert status_of(first) == 200
        # Head and body may come in two segments: read the whole answer first.
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            more = sock.recv(65536)
            assert more, "closed before the body"
            body += more
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        # uvicorn's default is 5 s.
        assert time.monotonic() - started < 3.5


# --- connections ---------------------------------------------------------------------------


@contextlib.contextmanager
def idle_connections(server: Server, n: int) -> Iterator[list[socket.socket]]:
    socks = [connect(server) for _ in range(n)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_connections_beyond_max_connections_get_503(few_connections: Server) -> None:
    s = few_connections
    with idle_connections(s, 2):
        # This one is the third: served.
        assert raw_request(s.url, "GET /healthz HTTP/1.1").status == 200
    with idle_connections(s, 3):
        assert raw_request(s.url, "GET /healthz HTTP/1.1").status == 503
    # Once they are gone, served again.
    assert wait_until(
        lambda: raw_request(s.url, "GET /healthz HTTP/1.1").status == 200, 5)


def test_a_burst_over_max_connections_serves_the_first_come(few_connections: Server) -> None:
    """Five connections opened before any asks: the first three are served, the other
    two refused (uvicorn's own test counted all five at each request: every one got 503,
    and a burst of 1,000 at once on a cap of 512 was served none)."""
    s = few_connections
    assert wait_until(lambda: raw_request(s.url, "GET /healthz HTTP/1.1").status == 200, 5)
    with idle_connections(s, 5) as socks:
        # The last two ask first: by their answers every one of the five is accepted.
        statuses = {}
        for i in (3, 4, 0, 1, 2):
            socks[i].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            statuses[i] = status_of(socks[i].recv(65536))
    assert statuses == {0: 200, 1: 200, 2: 200, 3: 503, 4: 503}


# --- absurd header values ------------------------------------------------------------------


def test_a_1_6_mb_if_none_match_is_answered_fast_and_healthz_stays_prompt(
        make_server: type[Server]) -> None:
    value = '"no-such-tag",' * (1_600_000 // 14)
    with make_server({"EXPORTER_MAX_HEADER_BYTES": str(4 * MiB)}) as s:
        result: dict[str, object] = {}

        def ask() -> None:
            started = time.monotonic()
            r = httpx.get(s.url + "/files/README.txt", headers={"If-None-Match": value},
                          timeout=60)
            result["status"], result["seconds"] = r.status_code, time.monotonic() - started

        asker = threading.Thread(target=ask)
        asker.start()
        slowest = 0.0
        while asker.is_alive():
            started = time.monotonic()
            assert httpx.get(s.url + "/healthz", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.02)
        asker.join()
        assert result["status"] == 200
        # Before: 9 s or more, the event loop stalled all along.
        assert isinstance(result["seconds"], float) and result["seconds"] < 3
        assert slowest < 1.5


# --- absurd numbers and dates ----------------------------------------------------------------


@pytest.mark.parametrize("query", [f"limit={HUGE}", f"offset={HUGE}",
                                   "limit=99999999999999999999", f"limit=000{HUGE}"])
def test_export_numbers_of_thousands_of_digits_are_400(server: Server, query: str) -> None:
    r = httpx.get(f"{server.url}/datasets/orders.csv?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["parameter"] == query.split("=")[0]


@pytest.mark.parametrize("query", [f"limit={HUGE}", f"offset={HUGE}", "offset=-1",
                                   "limit=1_0", "limit=\u0661"])
def test_listing_numbers_of_thousands_of_digits_are_400(server: Server, query: str) -> None:
    r = httpx.get(f"{server.url}/files/?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["parameter"] == query.split("=")[0]


def test_listing_numbers_still_work(server: Server) -> None:
    r = httpx.get(f"{server.url}/files/?limit=0002&offset=0")
    assert r.status_code == 200
    assert len(r.json()["entries"]) == 2


@pytest.mark.parametrize(("range_header", "status", "content_range"), [
    (f"bytes={HUGE}-", 416, "bytes */31"),
    (f"bytes=0-{HUGE}", 206, "bytes 0-30/31"),
    (f"bytes=-{HUGE}", 206, "bytes 0-30/31"),
    (f"bytes=5-{HUGE}, {HUGE}-", 206, "bytes 5-30/31"),
    (f"bytes=99999999999999999999-{HUGE}", 416, "bytes */31"),
])
def test_ranges_with_numbers_of_thousands_of_digits(
        server: Server, range_header: str, status: int, content_range: str) -> None:
    # README.txt: "Demo files served by exporter.\n", 31 bytes.
    r = httpx.get(f"{server.url}/files/README.txt", headers={"Range": range_header})
    assert r.status_code == status
    assert r.headers["content-range"] == content_range


OVERFLOWING_DATES = [
    "Sun, 06 Nov 99999999999999999999 08:49:37 GMT",
    "Sun, 06 Nov 1994 99999999999999999999:49:37 GMT",
    "Sun, 06 Nov 1994 08:49:37 +99999999999999999999",
]


@pytest.mark.parametrize("date", OVERFLOWING_DATES)
@pytest.mark.parametrize("header", ["If-Modified-Since", "If-Unmodified-Since", "If-Range"])
def test_dates_that_overflow_are_ignored(server: Server, header: str, date: str) -> None:
    headers = {header: date, "Range": "bytes=0-3"} if header == "If-Range" else {header: date}
    r = httpx.get(f"{server.url}/files/README.txt", headers=headers)
    # An invalid date is ignored (RFC 9110 §13.1.3); an invalid If-Range means the whole file.
    assert r.status_code == 200, r.text
    assert r.content == b"Demo files served by exporter.\n"


# --- forwarded addresses ---------------------------------------------------------------------


def _audited_client(server: Server, database_url: str, marker: str) -> str:
    r = httpx.get(f"{server.url}/files/README.txt",
                  headers={"X-Forwarded-For": "203.0.113.9", "Range": marker})
    assert r.status_code == 206

    rows = audited(database_url, "range = $1", marker)
    assert len(rows) == 1
    return str(rows[0]["client"])


def test_x_forwarded_for_from_loopback_is_not_believed_by_default(
        server: Server, database_url: str) -> None:
    marker = f"bytes=0-1,0-{time.time_ns()}"
    assert _audited_client(server, database_url, marker) == "127.0.0.1"


def test_x_forwarded_for_is_believed_from_forwarded_allow_ips(
        timeouts: Server, database_url: str) -> None:
    marker = f"bytes=0-1,0-{time.time_ns()}"
    assert _audited_client(timeouts, database_url, marker) == "203.0.113.9"
