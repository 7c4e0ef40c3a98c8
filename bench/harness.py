"""What every benchmark shares: processes, clients, RSS sampling, interleaved runs, reports.

The machines are shared and noisy, so each contender is run several times, the
contenders interleaved (A B C, B C A, ...), and the median is reported with the
spread (min to max) next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
    # CPU seconds by process ("server", "postgres", "client"), when measured (CpuMeter).
    cpu: dict[str, float] = field(default_factory=dict)


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

    def cpu(self, process: str) -> float | None:
        """Median CPU seconds of one process over the runs (None: not measured)."""
        values = [r.cpu[process] for r in self.runs if process in r.cpu]
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


# --- CPU time ------------------------------------------------------------------------


def _cpu_seconds(process: psutil.Process, reaped: bool = False) -> float:
    """User and system CPU of a process; with `reaped`, also of its children that exited
    and were waited for (PostgreSQL's backends that ended during a run)."""
    try:
        t = process.cpu_times()
    except psutil.NoSuchProcess:  # it ended meanwhile: its time is its parent's now
        return 0.0
    own = float(t.user + t.system)
    return own + float(t.children_user + t.children_system) if reaped else own


def postmaster_pid(data_directory: Path) -> int | None:
    """The PID of the PostgreSQL server running in `data_directory` (the first line of
    its postmaster.pid); None when it cannot be read (a server on another machine)."""
    try:
        return int((data_directory / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class CpuTimes:
    seconds: dict[str, float] = field(default_factory=dict)


class CpuMeter:
    """CPU seconds spent during a run by each process of an export's path: the server
    (all its threads), PostgreSQL (every process of the cluster, the backends that ended
    during the run included: their time is the postmaster's children's once it reaped
    them), and the client (the children of this process that were waited for: curl,
    psql)."""

    def __init__(self, postmaster: int | None) -> None:
        self._postmaster = psutil.Process(postmaster) if postmaster is not None else None

    def _backends(self) -> list[psutil.Process]:
        assert self._postmaster is not None
        try:
            return list(self._postmaster.children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def _postgres(self, started: set[int]) -> float:
        if self._postmaster is None:
            return 0.0
        # A backend that began in the run and is ending (psql's, after psql exited) is
        # waited for: until the postmaster reaps it, its time is in neither place.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and self._unreaped(started):
            time.sleep(0.01)
        return _cpu_seconds(self._postmaster, reaped=True) + sum(
            _cpu_seconds(p) for p in self._backends())

    def _unreaped(self, started: set[int]) -> bool:
        for backend in self._backends():
            if backend.pid in started:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                if backend.status() == psutil.STATUS_ZOMBIE:
                    return True
        return False

    @staticmethod
    def _client() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    @contextlib.contextmanager
    def measure(self, server_pid: int | None) -> Iterator[CpuTimes]:
        server = psutil.Process(server_pid) if server_pid is not None else None
        times = CpuTimes()
        started = {p.pid for p in self._backends()} if self._postmaster else set()
        before = (_cpu_seconds(server) if server else 0.0, self._postgres(started),
                  self._client())
        yield times
        after = (_cpu_seconds(server) if server else 0.0, self._postgres(started),
                 self._client())
        names = ("server", "postgres", "client")
        times.seconds = {name: b - a for name, a, b in zip(names, before, after, strict=True)
                         if (name != "server" or server) and
                         (name != "postgres" or self._postmaster)}


def with_cpu(contender: Contender, meter: CpuMeter) -> Contender:
    """The contender, its runs also measuring the CPU time of each process (Run.cpu)."""
    inner = contender.run

    def run() -> Run:
        pid = contender.server_pid() if contender.server_pid is not None else None
        with meter.measure(pid) as times:
            result = inner()
        result.cpu = times.seconds
        return result

    return dataclasses.replace(contender, run=run)


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
                       concurrent_exports=4, slow_client_seconds=1, file_size=32 * MiB,
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


# --- a benchmark's command -----------------------------------------------------------


def log(message: str) -> None:
    """Progress, on stderr: the report alone goes to stdout."""
    print(message, file=sys.stderr, flush=True)


def arguments(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """What a benchmark run by hand takes (--quick, --rows, --rounds, --work); it adds
    its own."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data, few rounds")
    parser.add_argument("--rows", type=int, help="rows of exports.orders")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--work", type=Path,
                        help="where the database is kept (default var/bench-NAME/)")
    return parser


def plan_of(args: argparse.Namespace, name: str, *, rows: int, quick_rows: int, rounds: int,
            quick_rounds: int) -> Plan:
    """The plan of a benchmark run by hand: its own folder and database (var/bench-NAME/,
    or --work), exports.orders of --rows, --rounds rounds."""
    work = args.work or ROOT / "var" / (f"bench-{name}-quick" if args.quick else f"bench-{name}")
    return dataclasses.replace(
        Plan.make(args.quick, out=work, work=work),
        demo_rows=args.rows or (quick_rows if args.quick else rows), generated_rows=1000,
        repetitions=args.rounds or (quick_rounds if args.quick else rounds))


def measured_by(command: str, started: float) -> str:
    """The report's first words: the command as run, when, on what, how long."""
    return (f"Measured by `{command}` on {time.strftime('%Y-%m-%d')}, {machine()}, in "
            f"{(time.monotonic() - started) / 60:.1f} minutes")
