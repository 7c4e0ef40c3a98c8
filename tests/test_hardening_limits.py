"""No client can starve the others: slow clients are capped and cut, a download tool's
parallel connections wait for a slot, /healthz answers while the server is full and
says what is wrong without internals, and no audit row stays `running`."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.support import Server, audited, fetch, rows_of, run_sql, wait_until
from tests.test_access import CLOSED, bearer, make_link, new_token

# Connections of the exporter's pool that hold a snapshot or wait on a client.
STUCK = (
    "SELECT pid, state, wait_event, left(query, 60) AS query FROM pg_stat_activity"
    " WHERE application_name = 'exporter' AND datname = current_database()"
    " AND (state LIKE 'idle in transaction%' OR wait_event = 'ClientWrite'"
    "      OR (state = 'active' AND query LIKE 'COPY%'))"
)


@pytest.fixture(scope="module")
def endless(database_url: str) -> None:
    # Hours of output (generate_series in the select list streams).
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.endless AS"
            " SELECT generate_series(1, 1000000000) AS id, repeat('x', 200) AS pad")


@pytest.fixture(scope="module")
def people(database_url: str) -> dict[str, tuple[str, str]]:
    """(name, secret) of a few tokens: two hogs, a bystander and an admin."""
    suffix = hashlib.sha256(os.urandom(8)).hexdigest()[:6]
    scopes = {"hog-a": ["datasets:*"], "hog-b": ["datasets:*"],
              "bystander": ["datasets:orders", "files:*"], "admin": ["admin"]}
    return {key: (f"{key}-{suffix}", new_token(database_url, f"{key}-{suffix}", *s))
            for key, s in scopes.items()}


def silent_export(server: Server, path: str, headers: dict[str, str]) -> socket.socket:
    """A client that asks for an export and then reads nothing."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
             *(f"{k}: {v}" for k, v in headers.items())]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return s


def read_to_end(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = bytearray()
    while chunk := s.recv(1 << 20):
        data += chunk
    return bytes(data)


def health(server: Server) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    r = httpx.get(server.url + "/healthz", timeout=10)
    return time.monotonic() - started, r


def max_download_id(database_url: str) -> int:
    return int(fetch(database_url, "SELECT coalesce(max(id), 0) AS n FROM exporter.downloads")
               [0]["n"])


@pytest.mark.needs("curl")
def test_slow_clients_of_one_token_starve_no_one_and_are_cut_curl(
    make_server: type[Server], database_url: str, endless: None,
    people: dict[str, tuple[str, str]], tmp_path: Path,
) -> None:
    """The reproduction: hogs fill the server with exports they do not read (raw sockets
    through the header, curl --limit-rate 5k through the cookie, more through signed
    links); everyone else still gets a quick answer, /healthz says busy at once, and the
    idle timeout cuts the hogs: no snapshot left open, no audit row left running."""
    env = {**CLOSED, "EXPORTER_POOL_SIZE": "4", "EXPORTER_POOL_MAX_OVERFLOW": "2",
           "EXPORTER_MAX_EXPORTS": "4", "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "2",
           "EXPORTER_EXPORT_IDLE_TIMEOUT": "6", "EXPORTER_LIMIT_WAIT": "1",
           "EXPORTER_MAX_EXPORTS_WAIT": "0.5"}
    (a_name, a), (b_name, b) = people["hog-a"], people["hog-b"]
    bystander, admin = people["bystander"][1], people["admin"][1]
    first_id = max_download_id(database_url)
    sockets: list[socket.socket] = []
    curls: list[subprocess.Popen[bytes]] = []
    with make_server(env) as s:
        links = [make_link(s, a, f"/datasets/endless.csv?id=gt.{i}") for i in range(2)]
        try:
            sockets = [silent_export(s, "/datasets/endless.csv", bearer(a)) for _ in range(2)]
            curls = [subprocess.Popen(
                ["curl", "-sS", "--limit-rate", "5k", "-o", f"slow-{i}.csv",
                 "-H", f"Cookie: exporter_token={b}", s.url + "/datasets/endless.csv"],
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for i in range(2)]
            assert wait_until(lambda: health(s)[1].json()["exports"]["active"] == 4, 10)
            time.sleep(0.5)  # their buffers full, all four now wait on their clients

            # More from the hog, through links: over its budget or over the server's cap.
            for link in links:
                r = httpx.get(link, timeout=10)
                assert r.status_code in (429, 503), r.text
                assert r.headers["retry-after"]

            started = time.monotonic()
            r = httpx.get(s.url + "/datasets/orders.csv?limit=3", headers=bearer(bystander),
                          timeout=10)
            assert time.monotonic() - started < 3
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.headers["retry-after"]
                assert "exports" in r.json()["error"]["message"]
            # Files and admin work do not need an export slot: they are served at once.
            started = time.monotonic()
            f = httpx.get(s.url + "/files/README.txt", headers=bearer(bystander), timeout=10)
            assert f.status_code == 200
            d = httpx.get(s.url + "/downloads?limit=1", headers=bearer(admin), timeout=10)
            assert d.status_code == 200
            assert time.monotonic() - started < 3

            took, h = health(s)
            assert took < 1.5, f"/healthz took {took:.2f} s"
            assert h.status_code == 200
            assert h.json()["status"] == "busy"
            assert h.json()["exports"] == {"active": 4, "max": 4, "waiting": 0}

            # The idle timeout cuts all four: their snapshots and connections are gone.
            assert wait_until(lambda: health(s)[1].json()["exports"]["active"] == 0, 15)
            assert wait_until(lambda: fetch(database_url, STUCK) == [], 5), \
                fetch(database_url, STUCK)
            # Audit rows are written in batches: the cut ones close within a flush or two.
            rows = audited(database_url, "id > $1 AND target = 'endless'", first_id)
            hogs = [r for r in rows if r["principal"] in (f"token {a_name}", f"token {b_name}")]
            assert len(hogs) == 4, rows
            for row in rows:
                assert row["status"] != "running", rows
            for row in hogs:
                assert row["status"] == "aborted"
                assert row["error"] == "cut: the client read nothing for 6 s"
            # A cut client sees a broken download: the chunked body never ends.
            for sock in sockets:
                data = read_to_end(sock, 10)
                assert data.startswith(b"HTTP/1.1 200")
                assert not data.endswith(b"0\r\n\r\n")
            assert "cut: the client read nothing" in s.log()

            # And the server is free again.
            r = httpx.get(s.url + "/datasets/orders.csv?limit=3", headers=bearer(bystander))
            assert r.status_code == 200
            assert health(s)[1].json()["status"] == "ok"
        finally:
            for sock in sockets:
                sock.close()
            for p in curls:
                p.kill()
                p.wait()


@pytest.mark.needs("curl")
def test_curl_parallel_six_transfers_finish_without_retries(
    make_server: type[Server], files_root: Path, tmp_path: Path
) -> None:
    """`curl --parallel --parallel-max 6 -f`: four slots per client, the other two
    transfers wait for one instead of failing with 429."""
    size = 4 * 2**20
    rate = 4 * 2**20  # the server's pace: each transfer takes about a second
    argv = ["curl", "--parallel", "--parallel-max", "6", "-f", "-sS", "-r", f"0-{size - 1}"]
    for i in range(6):
        argv += ["-o", f"{i}.bin", "/files/large.bin"]
    with make_server({"EXPORTER_MAX_BYTES_PER_SECOND": str(rate)}) as s:
        argv = [s.url + a if a.startswith("/files/") else a for a in argv]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=60)
        took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    with (files_root / "large.bin").open("rb") as f:
        expected = f.read(size)
    for i in range(6):
        assert (tmp_path / f"{i}.bin").read_bytes() == expected
    # Two rounds: two of the transfers did wait for a slot.
    assert took > 1.8 * size / rate, f"took {took:.1f} s: the transfers did not overlap"


@pytest.mark.needs("aria2c")
def test_aria2c_eight_connections_finish_without_retries(
    make_server: type[Server], tmp_path: Path
) -> None:
    """`aria2c -x 8` opens 8 connections at once against a cap of 4: the other four wait
    for a slot instead of meeting a 429 and retrying."""
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(16 * 2**20)
    (root / "big.bin").write_bytes(data)
    rate = 8 * 2**20  # the server's pace per connection: each 2 MiB piece takes 0.25 s
    with make_server({"EXPORTER_FILES_ROOT": str(root),
                      "EXPORTER_MAX_BYTES_PER_SECOND": str(rate)}) as s:
        done = subprocess.run(
            ["aria2c", "-x", "8", "-s", "8", "-k", "1M", "--max-tries=1", "--retry-wait=0",
             "--allow-overwrite=true", "--auto-file-renaming=false", "--console-log-level=notice",
             "--summary-interval=0", "--log=aria2.log", "--log-level=info",
             "-d", str(tmp_path), "-o", "out.bin", s.url + "/files/big.bin"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "aria2.log").read_text(errors="replace")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out.bin").read_bytes() == data
    # It did open more connections at once than the cap of 4.
    assert log.count("Connecting to") >= 8, log
    # The status line of an answer, not a millisecond timestamp such as 22:16:50.429.
    assert not re.search(r"HTTP/1\.[01] 429", log), "a connection met 429"
    assert "Too Many Requests" not in log


def test_waiting_for_a_slot_gives_up_when_the_client_leaves(
    make_server: type[Server], database_url: str, people: dict[str, tuple[str, str]]
) -> None:
    token = people["bystander"][1]
    marker = random.randrange(10**8, 10**9)
    with make_server({**CLOSED, "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "1",
                      "EXPORTER_LIMIT_WAIT": "10"}) as s:
        holder = httpx.stream("GET", s.url + "/files/large.bin", headers=bearer(token))
        response = holder.__enter__()
        assert response.status_code == 200
        ghost = silent_export(s, f"/datasets/orders.csv?id=eq.{marker}", bearer(token))
        time.sleep(0.5)
        ghost.close()  # left while waiting in the queue
        result: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: result.update(r=httpx.get(
            s.url + "/datasets/orders.csv?limit=2", headers=bearer(token), timeout=30)))
        waiter.start()
        time.sleep(1)
        holder.__exit__(None, None, None)  # its slot goes to the next one still waiting
        waiter.join(30)
        assert result["r"].status_code == 200
        assert result["r"].text.count("\n") == 3
        time.sleep(0.5)
        ghosts = fetch(database_url, "SELECT id FROM exporter.downloads"
                       " WHERE params::text LIKE $1", f"%eq.{marker}%")
        assert ghosts == [], "the request of a client that left ran anyway"


@pytest.mark.needs("curl")
def test_export_max_duration_cuts_the_download_curl(
    make_server: type[Server], database_url: str, endless: None, tmp_path: Path
) -> None:
    with make_server({"EXPORTER_EXPORT_MAX_DURATION": "1"}) as s:
        started = time.monotonic()
        done = subprocess.run(["curl", "-sS", "--limit-rate", "2M", "-o", "out.csv",
                               s.url + "/datasets/endless.csv?id=gt.7"],
                              cwd=tmp_path, capture_output=True, timeout=30)
        assert done.returncode == 18, done.stderr  # a broken download, not a short file
        # Cut by the 1 s limit (the view never ends); generous for a busy machine.
        assert time.monotonic() - started < 20
        assert (tmp_path / "out.csv").stat().st_size > 0
        assert wait_until(lambda: fetch(database_url, STUCK) == [], 5)
        row = audited(database_url, "id = (SELECT max(id) FROM exporter.downloads"
                      " WHERE target = 'endless')")[0]
        assert row["status"] == "failed"
        assert "EXPORTER_EXPORT_MAX_DURATION" in row["error"]


@pytest.mark.needs("curl")
def test_shutdown_closes_the_audit_rows_of_running_exports_curl(
    make_server: type[Server], database_url: str, endless: None, tmp_path: Path
) -> None:
    s = make_server().start()
    first_id = max_download_id(database_url)
    ours = rows_of(s)  # an earlier test's server may write its last batch meanwhile
    # 4 MB/s: what the loopback buffers hold when the server goes (curl's window grows to
    # 32 MB under load) still reaches curl before the end does; at 1 MB/s that took >10 s.
    curl = subprocess.Popen(["curl", "-sS", "--limit-rate", "4M", "-o", "out.csv",
                             s.url + "/datasets/endless.csv"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: (tmp_path / "out.csv").exists(), 10)
        s.stop()
        assert curl.wait(30) != 0
    finally:
        curl.kill()
        curl.wait()
    rows = fetch(database_url, "SELECT status FROM exporter.downloads WHERE id > $1"
                 " AND instance LIKE $2", first_id, ours)
    assert [r["status"] for r in rows] == ["aborted"]


def _uvicorn(make_server: type[Server], url: str) -> Server:
    s = make_server(url=url)
    s.command = [sys.executable, "-m", "uvicorn", "--factory", "exporter.app:create_app",
                 "--host", "127.0.0.1", "--port", str(s.port)]
    return s.start()


@pytest.mark.parametrize("case", ["unknown role", "unreachable"])
def test_database_problems_are_503_without_internals(
    make_server: type[Server], database_url: str, case: str
) -> None:
    if case == "unknown role":
        url = make_url(database_url).set(username="nosuchrole_q7").render_as_string(
            hide_password=False)
        secrets = ["nosuchrole_q7", make_url(database_url).database or ""]
        expected = "refused the server's credentials"
    else:
        url = "postgresql://someuser_q7@127.0.0.1:9/nothing"
        secrets = ["someuser_q7", "127.0.0.1", ":9", "nothing", "Errno"]
        expected = "cannot be reached"
    s = _uvicorn(make_server, url)
    took, h = health(s)
    assert took < 1.5
    assert h.status_code == 503
    assert h.headers["retry-after"]
    assert h.json()["status"] == "unavailable"
    assert expected in h.json()["error"]
    r = httpx.get(s.url + "/datasets/orders.csv", timeout=30)
    assert r.status_code == 503, r.text
    assert expected in r.json()["error"]["message"]
    for text in (h.text, r.text):
        for secret in secrets:
            assert secret not in text
        assert "SELECT" not in text and "Error" not in text
