"""The newcomer's path: `exporter serve` from nothing, and the commands it prints."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.support import free_port

DEMO_ROWS = 20_000


def test_help_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "--help"], capture_output=True, text=True,
        check=True,
    ).stdout
    for command in ("serve", "migrate", "demo"):
        assert command in out
    serve = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "serve", "--help"], capture_output=True,
        text=True, check=True,
    ).stdout
    for option in ("--host", "--port", "--workers"):
        assert option in serve


def test_serve_from_nothing_with_the_embedded_database(tmp_path: Path) -> None:
    """No database URL: init the embedded server, migrate, load the demo, serve; the
    printed curl and wget commands work as printed; SIGINT stops the database too."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    # The demo's sizes, smaller: what is checked is that they are made, not how long
    # a million rows take (bench/startup.py measures that). Run from tmp_path, whose
    # var/files is then the default files root the demo files go into (not the checkout's).
    env.update(EXPORTER_DATA_DIR=str(tmp_path / "var"), PYTHONUNBUFFERED="1",
               EXPORTER_DEMO_ROWS=str(DEMO_ROWS), EXPORTER_DEMO_FILE_SIZE="1M")
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        output = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}" in output
        commands = [line.strip() for line in output.splitlines()
                    if line.strip().startswith(("curl ", "wget "))]
        assert any(c.startswith("curl") for c in commands)
        assert any(c.startswith("wget") for c in commands)
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        for command in commands:
            done = subprocess.run(shlex.split(command), cwd=downloads, capture_output=True,
                                  timeout=60)
            assert done.returncode == 0, (command, done.stderr)
        saved = sorted(p.name for p in downloads.iterdir())
        assert any(re.fullmatch(r"orders-\d{8}T\d{6}Z\.csv", n) for n in saved), saved
        assert any(re.fullmatch(r"orders-\d{8}T\d{6}Z\.ndjson", n) for n in saved), saved
        assert httpx.get(f"http://127.0.0.1:{port}/datasets").status_code == 401
        token = re.search(r"exp_[A-Za-z0-9_-]{40,}", output)
        assert token is not None
        assert (tmp_path / "var" / "demo-token").read_text().strip() == token[0]
        catalog = httpx.get(f"http://127.0.0.1:{port}/datasets",
                            headers={"Authorization": f"Bearer {token[0]}"}).json()
        orders = next(d for d in catalog["datasets"] if d["name"] == "orders")
        assert abs(orders["estimated_rows"] - DEMO_ROWS) < DEMO_ROWS // 20  # an estimate
        assert (tmp_path / "var" / "files" / "README.txt").exists()
        postmaster = int((tmp_path / "var" / "pgdata" / "postmaster.pid").read_text().split()[0])
        assert psutil.pid_exists(postmaster)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert not psutil.pid_exists(postmaster) or psutil.Process(postmaster).status() == "zombie"
