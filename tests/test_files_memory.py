"""What a download holds in the server, and a file that changes while it is sent.

1,000 raw-socket clients that read a few bytes a second (or nothing) must not make the
server hold a chunk pile per connection; a file rewritten in place during a download
must reach the client as a failed download, not as a complete one of mixed bytes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from bench.slow_files import check, client_ranges, raise_open_files, slow_clients, trickle
from exporter.files.demo import write_large
from exporter.files.stream import ReadBudget, read_cached
from tests.support import Server, fetch, peak_rss_bytes, rss_bytes, wait_until

KiB, MiB = 1024, 1024 * 1024
SLOW_CLIENTS = 1000
# Measured before the fix: 764 MB peak for 1,000 slow clients (two chunks of up to
# 1 MiB waiting per connection); after it, about 180 MB (an idle server is about 90).
SLOW_RSS_BOUND = 300 * 1000 * 1000


def test_read_budget_counts_what_is_held() -> None:
    b = ReadBudget(budget=4 * MiB, floor=16 * KiB, ceiling=1 * MiB)
    b.active = 1
    assert b.chunk_size() == 1 * MiB
    # Stalled downloads keep their chunks: the next reads get what is left, then the floor.
    b.active, b.held = 4, 3 * MiB
    assert b.chunk_size() == 1 * MiB
    b.held = 4 * MiB - 100 * KiB
    assert b.chunk_size() == 100 * KiB
    b.held = 4 * MiB
    assert b.chunk_size() == 16 * KiB
    # Many downloads, none holding anything: a fair share, never under the floor.
    b.active, b.held = 100, 0
    assert b.chunk_size() == 4 * MiB // 100
    b.active = 10_000
    assert b.chunk_size() == 16 * KiB


def test_read_cached_takes_only_what_the_page_cache_holds(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    path = tmp_path / "cold.bin"
    path.write_bytes(data)
    with path.open("rb") as f:
        fd = f.fileno()
        os.fsync(fd)
        got = read_cached(fd, 0, MiB)  # just written: in the cache
        assert got is not None and bytes(got) == data[:MiB]
        got = read_cached(fd, 4 * MiB - 100, MiB)  # a short read at the end
        assert got is not None and bytes(got) == data[-100:]
        assert read_cached(fd, 4 * MiB, MiB) is None  # past the end
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if read_cached(fd, 0, MiB) is not None:
            pytest.skip("this file system keeps its pages in memory (tmpfs)")
        # Out of the cache: nothing, at once (the body then reads it in a thread).
        assert read_cached(fd, 2 * MiB, MiB) is None
        os.pread(fd, 4096, 2 * MiB)
        got = read_cached(fd, 2 * MiB, MiB)  # the first page at least
        assert got is not None and len(got) >= 4096
        assert bytes(got) == data[2 * MiB:2 * MiB + len(got)]


def test_thousand_slow_clients_memory(make_server: type[Server], tmp_path: Path,
                                      database_url: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    path = root / "ten.bin"
    write_large(path, 10 * MiB, seed=10)
    raise_open_files(2 * SLOW_CLIENTS + 512)  # the server inherits it
    s = make_server({"EXPORTER_FILES_ROOT": str(root),
                     "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": str(SLOW_CLIENTS + 10),
                     # The default connection cap (512) is below the 1,000 clients.
                     "EXPORTER_MAX_CONNECTIONS": str(SLOW_CLIENTS + 100),
                     # 1,000 requests at once each take a slot and start an audit row
                     # through the pool: on a loaded machine that queue outlasts 5 s.
                     "EXPORTER_POOL_TIMEOUT": "60",
                     # Only for speed: without it the kernel queues up to 4 MiB per
                     # client, read 16 KiB at a time, and the 1,000 answers take about
                     # twice as long to start. The server's RSS is the same either way.
                     "EXPORTER_SOCKET_NOTSENT_LOWAT": str(128 * KiB)}).start()
    at_rest = rss_bytes(s.pid)
    started = time.monotonic()
    with slow_clients(s.port, "/files/ten.bin",
                      client_ranges(SLOW_CLIENTS, 10 * MiB, 1 * MiB)) as clients:
        heads = time.monotonic() - started
        trickle(clients, 3, 64)
        held = rss_bytes(s.pid)
        got = check(clients, path, 10 * MiB)  # raises on a wrong status, header or byte
    peak = peak_rss_bytes(s.pid)
    print(f"\n{SLOW_CLIENTS} slow clients: all heads after {heads:.1f} s; server RSS at "
          f"rest {at_rest / 1e6:.0f} MB, while held {held / 1e6:.0f} MB, peak "
          f"{peak / 1e6:.0f} MB; the clients got {got:,} bytes")
    assert got >= SLOW_CLIENTS // 2 * 64  # the reading half got something
    assert peak < SLOW_RSS_BOUND


def _rewrite_during_curl(make_server: type[Server], tmp_path: Path, change: str,
                         known: bool = False
                         ) -> tuple[subprocess.CompletedProcess[bytes], bytes, Path, Server]:
    """`known`: the file's digest is computed first, by a whole download, so that the one
    changed is sent with sendfile (server/sendfile.py) rather than read."""
    root = tmp_path / "root"
    root.mkdir()
    name = f"{change}.bin"
    path = root / name
    # Loopback's socket buffers grow to tens of MiB for a slow reader (tcp_rmem's maximum
    # is 32 MiB here): a file that fits in them may be read whole before the change lands.
    # The replaced file is only read to the end (its old bytes are expected), so small.
    write_large(path, (8 if change == "replace" else 96) * MiB, seed=8)
    original = path.read_bytes()
    s = make_server({"EXPORTER_FILES_ROOT": str(root)}).start()
    if known:
        assert httpx.get(f"{s.url}/files/{name}", timeout=60).content == original
    out = tmp_path / "out.bin"
    # 4 MB/s: the change lands a tenth of a second in, long before the last byte; what
    # the socket buffers hold when the answer is cut (tens of MiB) then takes seconds.
    curl = subprocess.Popen(["curl", "-sS", "--limit-rate", "4M", "-o", str(out),
                             f"{s.url}/files/{name}"], stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and out.stat().st_size > 256 * KiB, 20)
        if change == "rewrite":  # same size, same inode, new bytes
            with path.open("r+b") as f:
                f.write(bytes(len(original)))
        elif change == "truncate":
            os.truncate(path, 1 * MiB)
        else:  # a new file renamed over the old one: the open one is still whole
            tmp = root / "new.part"
            tmp.write_bytes(bytes(len(original)))
            os.replace(tmp, path)
        _, err = curl.communicate(timeout=60)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    done = subprocess.CompletedProcess(curl.args, curl.returncode, b"", err)
    return done, original, out, s


def _audit_row(database_url: str, name: str) -> dict[str, object]:
    """The last download of `name`, once it ended."""
    def last() -> dict[str, object] | None:
        rows = fetch(database_url, "SELECT * FROM exporter.downloads WHERE target = $1 "
                     "ORDER BY id DESC LIMIT 1", name)
        return dict(rows[0]) if rows else None  # none yet: the audit writes in batches

    assert wait_until(lambda: (row := last()) is not None and row["status"] != "running", 10)
    row = last()
    assert row is not None
    return row


@pytest.mark.needs("curl")
def test_file_rewritten_in_place_fails_the_curl_download(
        make_server: type[Server], tmp_path: Path, database_url: str) -> None:
    result, original, out, s = _rewrite_during_curl(make_server, tmp_path, "rewrite")
    # 18: "transfer closed with N bytes remaining": the body was cut, not completed.
    assert result.returncode == 18, result.stderr
    got = out.read_bytes()
    assert len(got) < len(original)
    assert got == original[:len(got)]  # what was sent before the change is the old file
    row = _audit_row(database_url, "rewrite.bin")
    assert row["status"] == "failed"
    assert "FileChanged" in str(row["error"]) and "changed while it was sent" in str(row["error"])
    assert row["bytes"] == len(got)
    assert "FileChanged" in s.log()


@pytest.mark.needs("curl")
def test_file_truncated_fails_the_curl_download(
        make_server: type[Server], tmp_path: Path, database_url: str) -> None:
    result, original, out, _ = _rewrite_during_curl(make_server, tmp_path, "truncate")
    assert result.returncode == 18, result.stderr
    got = out.read_bytes()
    assert got == original[:len(got)] and len(got) < len(original)
    assert _audit_row(database_url, "truncate.bin")["status"] == "failed"


@pytest.mark.needs("curl")
@pytest.mark.parametrize("change", ["rewrite", "truncate"])
def test_a_file_changed_while_sendfile_sends_it_fails_the_curl_download(
        make_server: type[Server], tmp_path: Path, database_url: str, change: str) -> None:
    # sendfile takes the bytes from the page cache as it sends them, as nginx's does: what
    # leaves after the change may be new bytes, but the answer is cut, never complete.
    result, original, out, _ = _rewrite_during_curl(make_server, tmp_path, change, known=True)
    assert result.returncode == 18, result.stderr
    got = out.read_bytes()
    assert len(got) < len(original) and got[:256 * KiB] == original[:256 * KiB]
    row = _audit_row(database_url, f"{change}.bin")
    assert row["status"] == "failed"
    # A truncation is seen by the check between spans or by sendfile finding the end early.
    assert ("FileChanged" in str(row["error"])
            or (change == "truncate" and "EOFError" in str(row["error"]))), row


@pytest.mark.needs("curl")
def test_file_replaced_by_rename_completes_the_curl_download_with_the_old_bytes(
        make_server: type[Server], tmp_path: Path, database_url: str) -> None:
    # The open file is untouched by a rename over its name: its bytes are all consistent.
    result, original, out, _ = _rewrite_during_curl(make_server, tmp_path, "replace")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == original
    assert _audit_row(database_url, "replace.bin")["status"] == "complete"
