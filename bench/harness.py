"""What every benchmark shares: processes, clients, RSS sampling, interleaved runs, reports.

The machines are shared and noisy, so each contender is run several times, the
contenders interleaved (A B C, B C A, ...), and the median is reported with the
spread (min to max) next to it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

# The process helpers the tests use too; free_port is re-exported for the benchmarks.
from tests.support import free_port, spawn, stop_group, wait_answering

__all__ = ["free_port"]

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
MiB = 1024 * 1024


# --- the machine ---------------------------------------------------------------------


def machine() -> str:
    """One line: cores, memory, CPU, kernel; printed with every result."""
    mem = psutil.virtual_memory().total
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({cpu or platform.machine()}), "
            f"{mem / 2**30:.1f} GiB memory, Linux {platform.release()}, "
            f"load average at start {load}")


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- processes -----------------------------------------------------------------------


class Service:
    """A server process of ours (exporter, uvicorn app, nginx) in its own process group.

    Started with `start()`, always stopped with `stop()` (it is a context manager),
    so that a failing benchmark leaves nothing running.
    """

    def __init__(self, name: str, command: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        self.process = spawn(self.command, self.env, self.log_path)

    def wait_ready(self, path: str, timeout: float) -> float:
        """Seconds from spawn to the first answered request (any HTTP status)."""
        assert self.process is not None
        # Polled often: bench.startup measures this time.
        wait_answering(self.url + path, self.process, self.started_at + timeout, self.name,
                       self.log_tail, interval=0.02)
        return time.monotonic() - self.started_at

    def start(self, path: str = "/", timeout: float = 60) -> Service:
        self.spawn()
        try:
            self.wait_ready(path, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self.process, 20)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (nginx's workers, say)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may just have exited
            total += p.memory_info().rss
    return total


class RssSampler:
    """Samples a process tree's RSS in a thread; the kernel's VmHWM only knows one process
    and only its whole life, while this gives the peak over a window, and a time series."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, tree_rss(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self._t0, tree_rss(self.pid)))

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


# --- clients -------------------------------------------------------------------------


@dataclass
class CurlResult:
    seconds: float  # wall time of the process, measured by us
    bytes: int
    status: int
    first_byte: float  # curl's time_starttransfer


CURL_FORMAT = "%{size_download} %{http_code} %{time_starttransfer}"


def curl(url: str, *options: str, output: str = "/dev/null") -> CurlResult:
    """One download by a real `curl` process, body to /dev/null unless told."""
    command = ["curl", "-sS", "-o", output, "-w", CURL_FORMAT, *options, url]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()} {url}")
    size, status, first = done.stdout.split()
    return CurlResult(seconds, int(size), int(status), float(first))


def curls_at_once(requests: Sequence[Sequence[str]]) -> tuple[float, list[list[str]]]:
    """One `curl` process per request (its options and URL), all at once, bodies to
    /dev/null: the wall time to the last exit, and each one's size and status as text
    (an empty list for a curl that wrote nothing)."""
    start = time.monotonic()
    procs = [subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{http_code}", *request],
        stdout=subprocess.PIPE, text=True) for request in requests]
    outputs = [p.communicate()[0].split() for p in procs]
    return time.monotonic() - start, outputs


def timed(command: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of a command whose output goes to /dev/null."""
    start = time.monotonic()
    subprocess.run(list(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   check=True, env=env)
    return time.monotonic() - start


# --- measurements --------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    bytes: int
    peak_rss: int = 0  # of the server, bytes; 0 when it does not apply (psql)
    first_byte: float | None = None


@dataclass
class Contender:
    name: str
    command: str  # what a reader would type to do the same
    run: Callable[[], Run]
    server_pid: Callable[[], int] | None = None  # whose RSS is sampled during runs
    reference: bool = False
    max_runs: int | None = None  # for a contender too slow to repeat as often as the others


@dataclass
class Result:
    contender: Contender
    runs: list[Run] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def bytes(self) -> int:
        return max(r.bytes for r in self.runs)

    def throughput(self, seconds: float | None = None) -> float:
        """MB/s at the median time (or the given one)."""
        return self.bytes / (seconds if seconds is not None else self.median_seconds) / MB

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)

    @property
    def first_byte(self) -> float | None:
        values = [r.first_byte for r in self.runs if r.first_byte is not None]
        return statistics.median(values) if values else None


def interleaved(contenders: Sequence[Contender], repetitions: int,
                log: Callable[[str], None] = print, warmup: bool = True) -> list[Result]:
    """Each contender `repetitions` times, the order rotated each round, so that a slow
    minute on a shared machine is spread over all of them instead of hitting one."""
    results = [Result(c) for c in contenders]
    n = len(results)
    # One untimed round first: the first request of a fresh server imports and connects,
    # and the first read of a table may come from disk. Not for the slow ones (max_runs).
    for c in contenders:
        if warmup and c.max_runs is None:
            c.run()
    for rep in range(repetitions):
        for i in range(n):
            result = results[(i + rep) % n]
            c = result.contender
            if c.max_runs is not None and len(result.runs) >= c.max_runs:
                continue
            if c.server_pid is not None:
                with RssSampler(c.server_pid()) as rss:
                    run = c.run()
                run.peak_rss = max(run.peak_rss, rss.peak)
            else:
                run = c.run()
            result.runs.append(run)
            log(f"  {c.name}: {run.seconds:.3f} s, {run.bytes / MB:.1f} MB"
                + (f", server RSS {run.peak_rss / MiB:.0f} MiB" if run.peak_rss else ""))
    return results


# --- reports -------------------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    return f"{n / MiB:,.0f} MiB" if n >= MiB else f"{n / 1024:,.0f} KiB"


def fmt_seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


@dataclass
class Section:
    """A titled part of the report: prose, tables, a chart."""

    title: str
    lines: list[str] = field(default_factory=list)
    # Bullet points this section contributes to the report's Headline.
    headline: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.lines, ""])


def ratio(result: Result, reference: Result) -> float:
    """Throughput relative to the reference, for the same bytes: its time over ours."""
    return reference.median_seconds / result.median_seconds


def results_table(results: Sequence[Result], reference: Result | None = None,
                  references: dict[str, Result] | None = None) -> list[str]:
    """Median time, spread, throughput, server peak RSS, and throughput relative to the
    reference (its median time over ours: above 1 is faster than the reference).

    `references` maps a contender's name to its own reference (NDJSON against psql's
    row_to_json, for instance); the others use `reference`.
    """
    rows = [
        "| contender | command | median time | spread (min–max) | throughput | "
        "server peak RSS | vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = (references or {}).get(r.contender.name, reference)
        times = [x.seconds for x in r.runs]
        ratio = "reference" if r.contender.reference else (
            f"{ref.median_seconds / r.median_seconds:.2f}x" if ref else "")
        rss = fmt_bytes(r.peak_rss) if r.peak_rss else "–"
        rows.append(
            f"| {r.contender.name} | `{r.contender.command}` | {fmt_seconds(r.median_seconds)} "
            f"| {fmt_seconds(min(times))} – {fmt_seconds(max(times))} | "
            f"{r.throughput():,.0f} MB/s | {rss} | {ratio} |"
        )
    return rows


def bar_chart(path: Path, title: str, results: Sequence[Result]) -> None:
    """Throughput per contender: the median as the bar, the spread as the error bar."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    names = [r.contender.name for r in results]
    medians = [r.throughput() for r in results]
    fastest = [r.throughput(min(x.seconds for x in r.runs)) for r in results]
    slowest = [r.throughput(max(x.seconds for x in r.runs)) for r in results]
    errors = [[m - s for m, s in zip(medians, slowest, strict=True)],
              [f - m for m, f in zip(medians, fastest, strict=True)]]
    colors = ["#888888" if r.contender.reference else "#1f77b4" for r in results]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(results) + 1.5))
    ax.barh(names, medians, xerr=errors, color=colors, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("MB/s (median; bars: min–max)  grey = reference")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_chart(path: Path, title: str, series: dict[str, list[tuple[float, float]]],
               ylabel: str) -> None:
    """Values over time (the slow client's RSS and bytes ahead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, points in series.items():
        ax.plot([t for t, _ in points], [v for _, v in points], label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the plan of a run ---------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and places of one run; `--quick` is the same code on small data."""

    quick: bool
    work: Path  # data kept between runs: the database, the big file
    out: Path  # benchmarks.md and the charts
    repetitions: int
    demo_rows: int
    generated_rows: int  # the large export of the RSS comparison (a generate_series view)
    small_rows: int  # the small export it is compared with
    concurrent_exports: int
    slow_client_seconds: float
    file_size: int
    range_clients: int
    range_size: int

    @classmethod
    def make(cls, quick: bool, out: Path | None = None, work: Path | None = None) -> Plan:
        if quick:
            return cls(quick=True, work=work or ROOT / "var" / "bench-quick",
                       out=out or ROOT / "var" / "bench-quick", repetitions=2,
                       demo_rows=20_000, generated_rows=200_000, small_rows=10_000,
                       concurrent_exports=4, slow_client_seconds=3, file_size=32 * MiB,
                       range_clients=20, range_size=1 * MiB)
        return cls(quick=False, work=work or ROOT / "var" / "bench", out=out or ROOT / "docs",
                   repetitions=5, demo_rows=2_000_000, generated_rows=10_000_000,
                   small_rows=10_000, concurrent_exports=20, slow_client_seconds=60,
                   file_size=2 * 1024 * MiB, range_clients=100, range_size=10 * MiB)

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def chart(self, name: str) -> Path:
        return self.out / "benchmarks" / f"{name}.png"
