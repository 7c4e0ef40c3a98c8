"""The benchmark harness works: `python -m bench --quick` writes its tables and charts.

It checks the harness, not the numbers (timed assertions would fail on a busy machine).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import ROOT

EXPECTED_SECTIONS = [
    "## Headline",
    "## Exports: 20,000 rows of `exports.orders`",
    "## Exports: server memory against export size",
    "## Exports: 4 concurrent downloads of the whole table",
    "## Exports: a slow client",
    "## Files: one 32 MiB download",
    "## Files: 20 concurrent range clients",
    "## Files: `wget -c` resume of the last half",
    "## Start-up and latency",
]
EXPECTED_CHARTS = ["exports", "slow-client", "files-single", "files-concurrent", "files-resume"]


# nginx is the files' reference; curl, wget and ss are the harness's clients and probe.
@pytest.mark.needs("nginx", "curl", "wget", "ss")
def test_quick_benchmark_writes_tables_and_charts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    # Its own database and file, away from a manual run's var/bench-quick/; a short path,
    # because PostgreSQL's unix socket lives in it.
    work = Path(tempfile.mkdtemp(prefix="bq-"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path),
             "--work", str(work)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "benchmarks.md").read_text()
    for heading in EXPECTED_SECTIONS:
        assert heading in report, heading
    assert "quick run" in report
    assert "cores" in report and "GiB memory" in report
    for row in ["| psql CSV |", "| exporter CSV |", "| exporter NDJSON |",
                "| exporter filtered+ordered |", "| naive SQLAlchemy + csv |",
                "| nginx (sendfile) |", "| Starlette FileResponse |", "| exporter |"]:
        assert row in report, row
    assert "not available" not in report  # the exporter's own /files was measured
    for chart in EXPECTED_CHARTS:
        png = tmp_path / "benchmarks" / f"{chart}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart


@pytest.mark.needs("curl")
def test_parallel_benchmark_reports_the_goals_and_cpu(database_url: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m bench.parallel --quick` on the session's database: every goal against
    its psql reference for each setting, checked downloads (a length unlike psql's
    fails the run), and the CPU of each process."""
    from bench import parallel

    for key in [k for k in os.environ if k.startswith("EXPORTER_")]:
        monkeypatch.delenv(key)
    parallel.main(["--quick", "--database-url", database_url, "--work", str(tmp_path),
                   "--parallel", "1,2"])
    report = capsys.readouterr().out
    for row in ["| whole table, CSV |", "| NDJSON |", "| JSON array |",
                "| filtered (`amount < 1000.01`), CSV |"]:
        line = next(x for x in report.splitlines() if x.startswith(row))
        # The reference, one ratio per setting, the goal.
        assert len(re.findall(r"\*\*[0-9.]+\u00d7\*\*", line)) == 2, line
    assert "`EXPORTER_EXPORT_PARALLEL=1` | `EXPORTER_EXPORT_PARALLEL=2` |" in report
    cpu = {x.split(" | ")[0]: x.split(" | ") for x in report.splitlines()
           if x.startswith(("| psql", "| csv, ", "| json, "))}
    # psql: PostgreSQL (when it runs on this machine) and the client measured, no
    # server; the exporter: all three.
    local = parallel.postmaster(database_url) is not None
    assert cpu["| psql csv"][4] == "\u2013"
    assert cpu["| psql csv"][5].endswith(" s") == local
    exporter = cpu["| json, EXPORTER_EXPORT_PARALLEL=2"]
    assert exporter[4].endswith(" s") and exporter[6].endswith(" s")
    assert exporter[5].endswith(" s") == local
    assert "Server peak RSS" not in report  # not measured in --quick


# nginx is the reference and the X-Accel-Redirect proxy; curl the range clients.
@pytest.mark.needs("nginx", "curl")
def test_quick_burst_checks_every_byte_and_reports_the_goals(
        tmp_path: Path, database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    report = tmp_path / "burst.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.burst", "--quick", "--database-url", database_url,
         "--work", str(tmp_path / "work"), "--out", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    assert "## A burst of 60 connections for one 8 MiB file" in text
    # Below its connection cap, every connection is admitted and gets its bytes.
    assert "**exporter, as many as its connection cap, all at once**: 32 connections" in text
    assert "32 admitted, 32 of them got their 206 with the right bytes" in text
    assert "## 10 concurrent ranges of 256 KiB" in text
    for goal in ("exporter against nginx (one worker)", "X-Accel-Redirect against nginx direct",
                 "`--workers 2` against one worker", "server RSS at most 300 MB",
                 "`--workers 2` projected: not measured (--quick)"):
        assert goal in text, goal


def test_burst_projects_two_workers_from_their_cpu_per_gib() -> None:
    from bench.burst import CPU, MiB, cpu_per_gib, workers_projection

    CPU["exporter"] = [0.5, 0.8, 0.7]
    try:
        assert cpu_per_gib("exporter", 512 * MiB) == pytest.approx(1.4)
    finally:
        del CPU["exporter"]
    assert cpu_per_gib("exporter", 512 * MiB) is None
    same, worse = workers_projection(0.8, 0.8)[0], workers_projection(0.8, 1.6)[0]
    assert "1.00x the work per byte" in same and "2.00x one worker's" in same
    assert "met" in same and "1.00x one worker's" in worse and "**not met**" in worse
