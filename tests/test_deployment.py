"""Several server processes on one database, as a deployment runs them: the caps hold for
all of them together, a process that dies frees its slots within a lease and its audit
rows are closed when a process starts, every worker logs with time and level (a line per
finished download), and SIGTERM lets downloads finish within the grace, then cuts them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import LARGE_FILE_SIZE
from tests.support import Server, fetch, rows_of, run_sql, wait_until
from tests.test_access import CLOSED, bearer, new_token

LEASE = 3


@pytest.fixture(scope="module")
def endless(database_url: str) -> None:
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.endless AS"
            " SELECT generate_series(1, 1000000000) AS id, repeat('x', 200) AS pad")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextmanager
def holding(server: Server, token: str, path: str = "/files/large.bin") -> Iterator[None]:
    """A download in progress (its client reads nothing) for as long as the block runs."""
    client = httpx.Client(timeout=30)
    try:
        response = client.send(client.build_request("GET", server.url + path,
                                                    headers=bearer(token)), stream=True)
        assert response.status_code == 200, response.read()
        yield
        response.close()
    finally:
        client.close()


def slots_of(database_url: str, name: str) -> list[str]:
    """The instances holding the slots of token `name`."""
    rows = fetch(database_url, "SELECT instance FROM exporter.slots WHERE key LIKE $1",
                 f"principal token {name} #%")
    return sorted(r["instance"] for r in rows)


def timed_get(server: Server, path: str, token: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    r = httpx.get(server.url + path, headers=bearer(token), timeout=30)
    return time.monotonic() - started, r


def test_per_principal_cap_holds_across_two_server_processes(
    make_server: type[Server], database_url: str
) -> None:
    env = {**CLOSED, "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "2", "EXPORTER_LIMIT_WAIT": "2"}
    a, b = make_server(env).start(), make_server(env).start()
    name = unique("two-hosts")
    token = new_token(database_url, name, "files:*")
    result: dict[str, httpx.Response] = {}
    waiter = threading.Thread(target=lambda: result.update(r=timed_get(
        b, "/files/README.txt", token)[1]))
    with holding(b, token):
        with holding(a, token):
            held = slots_of(database_url, name)
            assert len(held) == 2 and held[0] != held[1], held  # one in each process
            for s in (a, b):
                took, r = timed_get(s, "/files/README.txt", token)
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"]
                assert took >= 1.9  # it waited EXPORTER_LIMIT_WAIT first
            waiter.start()
            time.sleep(0.5)
        # The slot given back in one process goes to the request waiting in the other.
        waiter.join(30)
        assert result["r"].status_code == 200
        assert result["r"].content == b"Demo files served by exporter.\n"
    assert wait_until(lambda: slots_of(database_url, name) == [], 10)


def test_export_cap_holds_across_two_server_processes(
    make_server: type[Server], database_url: str, endless: None
) -> None:
    env = {"EXPORTER_MAX_EXPORTS": "1", "EXPORTER_MAX_EXPORTS_WAIT": "0.5"}
    a, b = make_server(env).start(), make_server(env).start()
    token = new_token(database_url, unique("exports-cap"), "datasets:*")
    with holding(a, token, "/datasets/endless.csv"):
        for s in (a, b):
            r = httpx.get(s.url + "/datasets/orders.csv?limit=1", timeout=30)
            assert r.status_code == 503, r.text
            assert "as many exports" in r.json()["error"]["message"]
    assert wait_until(lambda: httpx.get(b.url + "/datasets/orders.csv?limit=1", timeout=30)
                      .status_code == 200, 10)


def test_killed_process_frees_its_slots_within_the_lease_and_its_rows_are_aborted(
    make_server: type[Server], database_url: str
) -> None:
    env = {**CLOSED, "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "2", "EXPORTER_LIMIT_WAIT": "0",
           "EXPORTER_SLOT_LEASE": str(LEASE)}
    a, b = make_server(env).start(), make_server(env).start()
    victim, bystander = unique("victim"), unique("bystander")
    token = new_token(database_url, victim, "files:*")
    other = new_token(database_url, bystander, "files:*")
    def statuses(name: str) -> list[str]:
        return [r["status"] for r in fetch(
            database_url, "SELECT status FROM exporter.downloads WHERE principal = $1"
            " AND target = 'large.bin' ORDER BY id", f"token {name}")]

    with holding(a, token), holding(a, token), holding(b, other):
        assert len(slots_of(database_url, victim)) == 2
        # The rows of downloads under way are written in batches (at most two a second
        # under load): a process killed before its batch loses those, so both are waited
        # for; what is tested is what the next start does with rows left running.
        assert wait_until(lambda: statuses(victim) == ["running", "running"], 10)
        os.killpg(a.pid, signal.SIGKILL)
        a.process.wait(10)  # type: ignore[union-attr]
        killed = time.monotonic()
        # Until the lease runs out the dead process's slots still count...
        assert timed_get(b, "/files/README.txt", token)[1].status_code == 429
        # ...and then no longer.
        assert wait_until(lambda: timed_get(b, "/files/README.txt", token)[1].status_code
                          == 200, LEASE + 10, interval=0.2)
        assert time.monotonic() - killed < LEASE + 3

        assert statuses(victim) == ["running", "running"]  # nobody has looked yet
        make_server(env).start()
        assert statuses(victim) == ["aborted", "aborted"]
        # The live process's download is left alone.
        assert statuses(bystander) == ["running"]
    errors = fetch(database_url, "SELECT DISTINCT error FROM exporter.downloads"
                   " WHERE principal = $1 AND target = 'large.bin'", f"token {victim}")
    assert [r["error"] for r in errors] == ["the server process ended during the download"]


PLAIN_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[(\d+)\] ")
BANNER = ("exporter serves ", "make a token with ")


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_two_workers_log_with_time_and_level_and_a_line_per_download(
    make_server: type[Server], log_format: str
) -> None:
    s = make_server({"EXPORTER_LOG_FORMAT": log_format})
    s.command = [sys.executable, "-m", "exporter.cli", "serve", "--port", str(s.port),
                 "--workers", "2"]
    s.start()
    r = httpx.get(s.url + "/files/README.txt", timeout=30)
    assert r.status_code == 200
    e = httpx.get(s.url + "/datasets/orders.csv?limit=3", timeout=30)
    assert e.status_code == 200

    def lines() -> list[str]:
        return [line for line in s.log().splitlines()
                if line.strip() and not line.startswith(BANNER)]

    def downloads() -> list[str]:
        return [line for line in lines() if "README.txt" in line and "complete" in line]

    def workers() -> set[str]:
        return {m[1] for line in lines()
                if (m := re.search(r"\[(\d+)\].*Application startup complete"
                                   if log_format == "plain" else
                                   r'"pid": ?(\d+).*Application startup complete', line))}

    assert wait_until(lambda: downloads() and any("orders" in line and "complete" in line
                                                   for line in lines()), 10), s.log()
    # The server answers once one worker is up; on a busy machine the other one can still
    # be starting, and stopping it then would leave it silent.
    assert wait_until(lambda: len(workers()) == 2, 60), s.log()
    s.stop()
    records: list[dict[str, object]] = []
    for line in lines():
        if log_format == "json":
            record = json.loads(line)  # every line parses
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", record["time"])
            assert record["level"] in ("INFO", "WARNING", "ERROR")
            records.append(record)
        else:
            match = PLAIN_LINE.match(line)
            assert match, line
            records.append({"pid": int(match[2]), "message": line})
    started = {rec["pid"] for rec in records
               if "Application startup complete" in str(rec["message"])}
    assert len(started) == 2, records  # both workers log, and say which they are
    assert s.pid not in started
    line = downloads()[0]
    if log_format == "json":
        download = json.loads(line)["download"]
        assert download["principal"] == "anonymous"
        assert download["target"] == "README.txt"
        assert download["bytes"] == len(r.content)
        assert download["status"] == "complete"
        assert 0 <= download["duration"] < 30
    else:
        assert re.search(rf"complete: anonymous file README.txt, {len(r.content)} bytes"
                         r" in \d+\.\d{3} s", line), line
    # The access log is on: uvicorn's lines come in the same format.
    assert any("GET /files/README.txt" in str(rec["message"]) for rec in records)


@pytest.mark.needs("curl")
def test_sigterm_lets_downloads_finish_within_the_grace_and_cuts_the_rest_curl(
    make_server: type[Server], database_url: str, endless: None, tmp_path: Path
) -> None:
    grace = 10  # not uvicorn's 5 s from before: this download needs more
    s = make_server({"EXPORTER_SHUTDOWN_GRACE": str(grace)}).start()
    first = int(fetch(database_url, "SELECT coalesce(max(id), 0) AS n"
                      " FROM exporter.downloads")[0]["n"])
    # 256 MiB at 30 MiB/s: about 8.5 s, within the grace (the server is done writing
    # about a second earlier: loopback socket buffers hold some 36 MB).
    finishing = subprocess.Popen(["curl", "-sS", "--limit-rate", "30M", "-o", "large.bin",
                                  s.url + "/files/large.bin"], cwd=tmp_path,
                                 stderr=subprocess.PIPE)
    # The two cut at the grace read at 4 MB/s: what the loopback buffers hold when the
    # server closes (up to 36 MB: curl's receive window grows to tcp_rmem's 32 MB under
    # load) is still read before curl sees the end, and at 1 MB/s that took over 20 s.
    endless_curl = subprocess.Popen(["curl", "-sS", "--limit-rate", "4M", "-o", "out.csv",
                                     s.url + "/datasets/endless.csv"], cwd=tmp_path,
                                    stderr=subprocess.PIPE)
    # A file download too slow to end within the grace: cut, and its audit row closed
    # (a body waiting to send when cut is not run to its end by anyone else).
    slow_file = subprocess.Popen(["curl", "-sS", "--limit-rate", "4M", "-o", "slow.bin",
                                  s.url + "/files/large.bin"], cwd=tmp_path,
                                 stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: (tmp_path / "out.csv").exists()
                          and (tmp_path / "large.bin").exists()
                          and (tmp_path / "slow.bin").exists(), 10)
        os.killpg(s.pid, signal.SIGTERM)
        stopped = time.monotonic()
        assert wait_until(lambda: not _listening(s.port), 10)
        # No new connections...
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/healthz", timeout=5)
        # ...while the download in progress runs to its end.
        assert finishing.wait(15) == 0, finishing.stderr
        assert (tmp_path / "large.bin").stat().st_size == LARGE_FILE_SIZE
        assert time.monotonic() - stopped > 5.5
        assert endless_curl.wait(20) == 18, endless_curl.stderr  # broken, not short
        assert slow_file.wait(20) == 18, slow_file.stderr
        assert (tmp_path / "slow.bin").stat().st_size < LARGE_FILE_SIZE
        # Cut at the grace, not before; the upper bound is only generous (a busy machine
        # is late, never early): without the cut, the endless one would never end.
        assert grace - 0.5 <= time.monotonic() - stopped < grace + 20
        assert s.process is not None and s.process.wait(20) is not None
    finally:
        for p in (finishing, endless_curl, slow_file):
            p.kill()
            p.wait()
    # Every row closed: the lifespan waits for the downloads' clean-ups before it writes
    # the last audit rows and disposes of the engine.
    rows = fetch(database_url, "SELECT target, status FROM exporter.downloads WHERE id > $1"
                 " AND instance LIKE $2 ORDER BY target, status", first, rows_of(s))
    assert [(r["target"], r["status"]) for r in rows] == [
        ("endless", "aborted"), ("large.bin", "aborted"), ("large.bin", "complete")]
