"""Start-up: from `exporter serve` to the first answered request, in three situations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.harness import Contender, Plan, Result, Run, Section, Service, fmt_seconds, interleaved

Log = Callable[[str], None]
READY_PATH = "/healthz"


def serve(plan: Plan, name: str, env: dict[str, str]) -> Service:
    from bench.harness import free_port

    port = free_port()
    service = Service(name, [sys.executable, "-m", "exporter.cli", "serve", "--port", str(port),
                             "--no-access-log", "--log-level", "warning"],
                      plan.logs / f"startup-{name}.log",
                      env={"EXPORTER_EXPORTS_DIR": str(plan.work / "exports"), **env}, port=port)
    # Unset, the embedded PostgreSQL is used: the variable must not leak in from our own.
    if "EXPORTER_DATABASE_URL" not in env:
        service.env.pop("EXPORTER_DATABASE_URL", None)
    return service


def time_to_ready(plan: Plan, name: str, env: dict[str, str], timeout: float) -> Run:
    with serve(plan, name, env) as service:
        service.spawn()
        return Run(service.wait_ready(READY_PATH, timeout), 0)


def initialised_data_dir(plan: Plan, log: Log) -> Path:
    """An embedded cluster with the exports schema already there, so that `serve` neither
    initialises nor loads demo rows: `exporter demo --rows 1000` made it, once."""
    data = plan.work / "startup-data"
    if not (data / "pgdata" / "PG_VERSION").exists():
        log("startup: initialising an embedded cluster for the warm start")
        env = {k: v for k, v in os.environ.items() if k != "EXPORTER_DATABASE_URL"}
        with (plan.logs / "startup-init.log").open("ab") as out:
            subprocess.run([sys.executable, "-m", "exporter.cli", "demo", "--rows", "1000",
                            "--files", "--file-size", "1M"],
                           env={**env, **warm_env(plan, data)}, stdout=out,
                           stderr=subprocess.STDOUT, check=True)
    return data


def warm_env(plan: Plan, data: Path) -> dict[str, str]:
    """The warm start's settings: its demo files in the work folder too (by default they
    would go into the data folder's files/, 1 GiB of them)."""
    return {"EXPORTER_DATA_DIR": str(data),
            "EXPORTER_FILES_ROOT": str(plan.work / "startup-files")}


def from_nothing(plan: Plan) -> Run:
    """A fresh data folder: initdb, migrations, and the 1,000,000 demo rows of a first start."""
    data = Path(tempfile.mkdtemp(prefix="startup-empty-", dir=plan.work))
    try:
        return time_to_ready(plan, "from-nothing", {"EXPORTER_DATA_DIR": str(data)}, 300)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def run(plan: Plan, url: str, first_byte: list[str], log: Log) -> list[Section]:
    warm = initialised_data_dir(plan, log)
    contenders = [
        Contender("EXPORTER_DATABASE_URL set (PostgreSQL already running)",
                  "EXPORTER_DATABASE_URL=... exporter serve",
                  lambda: time_to_ready(plan, "url", {"EXPORTER_DATABASE_URL": url}, 60)),
        Contender("embedded PostgreSQL, already initialised",
                  "exporter serve",
                  lambda: time_to_ready(plan, "embedded", warm_env(plan, warm), 120)),
    ]
    if not plan.quick:
        contenders.append(Contender(
            "embedded PostgreSQL from nothing (initdb + 1,000,000 demo rows)",
            "exporter serve  # empty EXPORTER_DATA_DIR", lambda: from_nothing(plan),
            max_runs=2))
    log("startup: time to the first answered request")
    # No warm-up round: every run is a new process anyway, and a start is what we measure.
    # One round in --quick (a test of the harness): each run is a whole server's start.
    results = interleaved(contenders, 1 if plan.quick else plan.repetitions, log,
                          warmup=False)
    section = Section("Start-up and latency")
    section.add(
        f"From spawning `exporter serve` to the first answered `GET {READY_PATH}` (polled "
        "every 20 ms).",
        "",
        *_table(results),
        "",
    )
    if plan.quick:
        section.add("The start from nothing is skipped in `--quick`: it loads the 1,000,000 "
                    "demo rows of a first start.", "")
    by_name = {r.contender.name: r for r in results}
    url_start = results[0]
    embedded = by_name["embedded PostgreSQL, already initialised"]
    section.headline.append(
        f"Start-up to the first answer: {fmt_seconds(url_start.median_seconds)} with "
        f"PostgreSQL running, {fmt_seconds(embedded.median_seconds)} with the embedded one "
        "already initialised" + "".join(
            f", {fmt_seconds(r.median_seconds)} from nothing (initdb and 1,000,000 demo rows)"
            for r in results[2:]) + ".")
    if first_byte:
        section.add("Time to the first byte of an export, measured during the export runs "
                    "above: it does not grow with the table.", "", *first_byte, "")
    return [section]


def _table(results: list[Result]) -> list[str]:
    rows = ["| start | command | median | spread (min–max) | runs |", "|---|---|---|---|---|"]
    for r in results:
        times = [x.seconds for x in r.runs]
        rows.append(f"| {r.contender.name} | `{r.contender.command}` | "
                    f"{fmt_seconds(r.median_seconds)} | {fmt_seconds(min(times))} – "
                    f"{fmt_seconds(max(times))} | {len(times)} |")
    return rows
