"""A slow client, one that leaves mid-file, and 50 at once: reading keeps step with them."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from exporter.files.demo import LARGE_NAME, write_large
from tests.conftest import LARGE_FILE_SIZE
from tests.support import Server, audited, fetch, last_audit_id, peak_rss_bytes, rss_bytes

CLIENTS = 50
FIFTY_FILE_SIZE = 32 * 1024 * 1024
# Measured: 89 MB at rest, peak 134 MB with 50 clients on 256 KiB chunks
# (each connection holds about one chunk plus uvicorn's write buffer).
RSS_BOUND = 200 * 1024 * 1024


def read_chars(pid: int) -> int:
    """Bytes the process has read through read(2) and friends, files included."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar")


def test_slow_client_then_disconnect(server: Server, database_url: str) -> None:
    # An earlier test's download of the same file may still be in the server's next batch,
    # or not even queued yet (its body's end runs after its client had the last byte):
    # this download is the one that started after this moment.
    before = last_audit_id(database_url, server.url)
    since = fetch(database_url, "SELECT clock_timestamp() AS t")[0]["t"]
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    sock.sendall(f"GET /files/{LARGE_NAME} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = 0
    while received < 2 * 1024 * 1024:
        received += len(sock.recv(65536))
    # A client that stops reading: the server may fill the socket buffers, no more.
    start = read_chars(server.pid)
    time.sleep(1.0)
    assert read_chars(server.pid) - start < 32 * 1024 * 1024
    sock.close()

    row = audited(database_url, "id > $1 AND target = $2 AND started_at >= $3", before,
                  LARGE_NAME, since)[0]
    assert row["status"] == "aborted" and row["http_status"] == 200
    assert received <= row["bytes"] < LARGE_FILE_SIZE // 4
    assert row["ended_at"] is not None
    # Reading stopped with the client.
    start = read_chars(server.pid)
    time.sleep(0.5)
    assert read_chars(server.pid) - start < 1024 * 1024


@pytest.mark.needs("curl")
def test_fifty_clients_memory(make_server: type[Server], tmp_path: Path) -> None:
    # What each connection holds is a chunk or two, whatever the file's size: 32 MiB
    # keeps all 50 downloads running at once for a while without moving gigabytes.
    root = tmp_path / "root"
    root.mkdir()
    write_large(root / LARGE_NAME, FIFTY_FILE_SIZE)
    # 50 clients from one address: lift the per-principal cap (4 by default) for this test.
    s = make_server({"EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": str(CLIENTS),
                     "EXPORTER_FILES_ROOT": str(root)}).start()
    at_rest = rss_bytes(s.pid)
    url = f"{s.url}/files/{LARGE_NAME}"
    clients = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w",
                                 "%{http_code} %{size_download}", url],
                                stdout=subprocess.PIPE) for _ in range(CLIENTS)]
    started = time.monotonic()
    try:
        results = [c.communicate(timeout=120)[0].decode() for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    elapsed = time.monotonic() - started
    assert results == [f"200 {FIFTY_FILE_SIZE}"] * CLIENTS
    peak = peak_rss_bytes(s.pid)
    print(f"\n{CLIENTS} x {FIFTY_FILE_SIZE >> 20} MiB in {elapsed:.1f} s "
          f"({CLIENTS * FIFTY_FILE_SIZE / elapsed / 1e6:.0f} MB/s); server RSS at rest "
          f"{at_rest / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB")
    assert peak < RSS_BOUND
