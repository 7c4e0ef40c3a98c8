"""Files sent with `sendfile` (server/sendfile.py): ranges, and whole files whose digest is
known, go from the page cache into the socket, and still answer every byte, every header
and every ending as the bytes read by the server did.

Met here: Range and multi-range, keep-alive (the next answer on the same connection),
OpenTelemetry tracing (its middleware wraps `send`),
HEAD, the digest's first computation (read, not sent by sendfile), metrics, the audit of a
client that leaves mid-span, the server's own descriptors; a rate limit, a file that
changes while it is sent, and the proxy are in test_hardening_limits, test_files_memory
and test_proxy.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support import Server, fetch, wait_until
from tests.test_metrics import scrape, value

MiB = 1024 * 1024
SIZE = 24 * MiB + 123
TAIL = 4096  # files/stream.py: each part's last bytes are read, checked, then sent


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> Path:
    root = tmp_path_factory.mktemp("sendfile")
    (root / "big.bin").write_bytes(data)
    (root / "other.bin").write_bytes(data[::-1])
    return root


@pytest.fixture(scope="module")
def server(make_module_server: type[Server], root: Path, traces: Path) -> Iterator[Server]:
    # Traced: OpenTelemetry's middleware wraps `send`, and meets the zero-copy messages.
    with make_module_server({"EXPORTER_FILES_ROOT": str(root), "EXPORTER_TRACING": "console",
                             "EXPORTER_TRACING_FILE": str(traces),
                             "OTEL_BSP_SCHEDULE_DELAY": "50"}) as s:
        yield s


def sendfile_bytes(server: Server, admin: str) -> float:
    return value(scrape(server.url + "/metrics", admin), "exporter_sendfile_bytes_total")


def test_ranges_and_known_files_go_out_with_sendfile_byte_for_byte(
        server: Server, admin: str, data: bytes, traces: Path) -> None:
    url = server.url + "/files/big.bin"
    before = sendfile_bytes(server, admin)
    # The first whole download computes the digest on the way: read, not sent by the kernel.
    first = httpx.get(url, timeout=60)
    assert first.status_code == 200 and first.content == data
    assert sendfile_bytes(server, admin) == before
    with httpx.Client(timeout=60) as client:  # one connection, kept alive throughout
        whole = client.get(url)
        assert whole.status_code == 200 and whole.content == data
        assert "repr-digest" in whole.headers
        after_whole = sendfile_bytes(server, admin)
        assert after_whole - before == SIZE - TAIL

        part = client.get(url, headers={"Range": "bytes=1000-20000999"})
        assert part.status_code == 206 and part.content == data[1000:20001000]
        assert part.headers["content-range"] == f"bytes 1000-20000999/{SIZE}"
        after_range = sendfile_bytes(server, admin)
        assert after_range - after_whole == 20_000_000 - TAIL

        # Two parts and their boundaries: each part's bytes from sendfile but its tail.
        multi = client.get(url, headers={"Range": "bytes=0-9999999,-5000000"})
        assert multi.status_code == 206
        boundary = multi.headers["content-type"].split("boundary=")[1].encode()
        parts = [p for p in multi.content.split(b"--" + boundary) if p.strip(b"-\r\n")]
        bodies = [p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts]
        assert bodies == [data[:10_000_000], data[-5_000_000:]]
        assert sendfile_bytes(server, admin) - after_range == 15_000_000 - 2 * TAIL

        # The connection still answers, with the bytes of another file.
        small = client.get(server.url + "/files/other.bin", headers={"Range": "bytes=-100"})
        assert small.status_code == 206 and small.content == data[::-1][-100:]
        head = client.head(url, headers={"Range": "bytes=0-99"})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(SIZE)

    def statuses() -> list[object]:
        lines = traces.read_text().splitlines() if traces.exists() else []
        return [json.loads(line)["attributes"].get("http.status_code") for line in lines]

    # One span per request, the ranges' with their status: none failed on the way.
    assert wait_until(lambda: statuses().count(206) >= 3, 10), statuses()


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_client_that_leaves_mid_span_is_aborted_with_no_error_and_no_descriptor_left(
        server: Server, database_url: str, data: bytes) -> None:
    # Warm: the server's own pools and files opened, so that only the download's count.
    assert httpx.get(server.url + "/files/other.bin", headers={"Range": "bytes=0-0"}
                     ).status_code == 206
    descriptors = _open_descriptors(server.pid)
    log_before = len(server.log())
    since = time.time()
    received = []
    for linger in (False, True):
        with socket.socket() as client:
            # A small window: the server's sendfile waits for room while the client is gone.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.connect(("127.0.0.1", server.port))
            client.sendall(b"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n"
                           b"Range: bytes=0-20971519\r\n\r\n")
            got = b""
            while len(got) < 1 * MiB:
                piece = client.recv(65536)
                assert piece
                got += piece
            assert got.startswith(b"HTTP/1.1 206")
            assert data[:1000] in got
            received.append(len(got) - got.index(b"\r\n\r\n") - 4)
            if linger:  # a reset rather than a close
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def rows() -> list[asyncpg.Record]:
        return fetch(database_url, "SELECT status, bytes FROM exporter.downloads WHERE"
                     " target = 'big.bin' AND range = 'bytes=0-20971519' AND started_at >="
                     " to_timestamp($1) ORDER BY id", since)

    def ended() -> list[str]:
        return [r["status"] for r in rows()]

    assert wait_until(lambda: ended() == ["aborted", "aborted"], 10), ended()
    # Counted: what went into the socket of the 8 MiB span under way, at least what the
    # client read (it was 0, the span not being whole, before the count of what left).
    for row, read in zip(rows(), received, strict=True):
        assert read <= row["bytes"] < 20971520, (row["bytes"], read)
    # Every duplicate of a socket closed, and the sockets themselves.
    assert wait_until(lambda: _open_descriptors(server.pid) <= descriptors, 10), (
        _open_descriptors(server.pid), descriptors)
    log = server.log()[log_before:]
    assert "Traceback" not in log and "ERROR" not in log, log
    answer = httpx.get(server.url + "/files/big.bin", headers={"Range": "bytes=-3000000"})
    assert answer.status_code == 206 and answer.content == data[-3_000_000:]


def test_a_file_sendfile_cannot_read_is_read_and_written_instead() -> None:
    """Some file systems (FUSE ones, most of /proc) have no splice reads: sendfile says
    EINVAL, and the send reads and writes instead, at the same offsets, into the socket."""
    from exporter.server import sendfile

    path = "/proc/self/cmdline"
    fd = os.open(path, os.O_RDONLY)
    out, client = socket.socketpair()
    try:
        with pytest.raises(OSError) as refused:
            os.sendfile(out.fileno(), fd, 0, 16)
        assert refused.value.errno in sendfile._NO_SENDFILE
        whole = os.pread(fd, 1 << 16, 0)
        assert len(whole) > 8
        message: dict[str, object] = {}
        first = sendfile._sendfile(out.fileno(), fd, 0, 5, message)
        rest = sendfile._sendfile(out.fileno(), fd, 5, len(whole) - 5, message)
        assert (first, rest) == (5, len(whole) - 5)
        assert message[sendfile.SENT] == len(whole)
        client.settimeout(5)
        got = b""
        while len(got) < len(whole):
            got += client.recv(1 << 16)
        assert got == whole
        # Past the end: the file is shorter than the range (truncated), as with sendfile.
        with pytest.raises(EOFError):
            sendfile._sendfile(out.fileno(), fd, len(whole), 10, message)
    finally:
        os.close(fd)
        out.close()
        client.close()
