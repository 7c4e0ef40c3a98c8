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
import pytest

from tests.support import ROOT, free_port


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


@pytest.mark.needs("curl", "wget")
def test_serve_from_nothing_with_the_embedded_database(tmp_path: Path) -> None:
    """No database URL: init the embedded server, migrate, load the demo, serve; the
    printed curl and wget commands work as printed; SIGINT stops the database too."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env.update(EXPORTER_DATA_DIR=str(tmp_path / "var"), PYTHONUNBUFFERED="1")
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "serve", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
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
        assert abs(orders["estimated_rows"] - 1_000_000) < 50_000  # an estimate
        postmaster = int((tmp_path / "var" / "pgdata" / "postmaster.pid").read_text().split()[0])
        assert psutil.pid_exists(postmaster)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert not psutil.pid_exists(postmaster) or psutil.Process(postmaster).status() == "zombie"
