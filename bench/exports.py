"""Exports against psql's `\\copy` (the physical limit) and a tutorial-style endpoint."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.database import GENERATED_VIEW, fetch, psql_command, psql_env
from bench.harness import (
    MB,
    Contender,
    Plan,
    Result,
    RssSampler,
    Run,
    Section,
    Service,
    bar_chart,
    curl,
    curls_at_once,
    fmt_bytes,
    fmt_seconds,
    free_port,
    interleaved,
    line_chart,
    ratio,
    results_table,
    timed,
    tree_rss,
)

Log = Callable[[str], None]

COLUMNS = "id,customer,amount,created_at"
# The demo rows are 25 s apart from 2026-01-01: this keeps about half of them.
SECONDS_BETWEEN_ROWS = 25


# The benchmark's clients are anonymous and many at once on loopback: open everything
# and lift the per-principal cap, so access control is not what is measured.
OPEN_ACCESS = {"EXPORTER_PUBLIC_DATASETS": '["*"]', "EXPORTER_PUBLIC_FILES": '["*"]',
               "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "1000"}


def exporter_service(plan: Plan, url: str, name: str, env: dict[str, str] | None = None
                     ) -> Service:
    port = free_port()
    return Service(
        name, [sys.executable, "-m", "exporter.cli", "serve", "--port", str(port),
               "--no-access-log", "--log-level", "warning"],
        plan.logs / f"{name}.log",
        # Stored exports (the copies streamed exports keep) in the benchmark's own folder.
        env={"EXPORTER_DATABASE_URL": url, "EXPORTER_EXPORTS_DIR": str(plan.work / "exports"),
             **OPEN_ACCESS, **(env or {})}, port=port,
    )


def naive_service(plan: Plan, url: str) -> Service:
    port = free_port()
    return Service(
        "naive", [sys.executable, "-m", "uvicorn", "bench.naive_app:app", "--port", str(port),
                  "--no-access-log", "--log-level", "warning"],
        plan.logs / "naive.log", env={"NAIVE_DATABASE_URL": url}, port=port,
    )


def peak_rss_hwm(pid: int) -> int:
    """The kernel's high-water mark of a process's resident memory over its whole life."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@dataclass(frozen=True)
class Query:
    """One export, as a psql `\\copy` and as the exporter's URL path."""

    name: str
    copy: str
    path: str


def queries(plan: Plan) -> dict[str, Query]:
    half = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(
        seconds=SECONDS_BETWEEN_ROWS * plan.demo_rows // 2)
    since = half.strftime("%Y-%m-%dT%H:%M:%SZ")
    select = "SELECT * FROM exports.orders"
    filtered = (f"SELECT id, customer, amount, created_at FROM exports.orders "
                f"WHERE created_at >= '{since}' ORDER BY id DESC")
    csv = "WITH (FORMAT csv, HEADER)"
    # NDJSON: the quote and delimiter bytes never occur in JSON text, so CSV format writes
    # each object untouched (text format would double every backslash).
    ndjson = "WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    return {
        "csv": Query("csv", f"\\copy ({select}) TO STDOUT {csv}", "/datasets/orders.csv"),
        "ndjson": Query("ndjson",
                        f"\\copy (SELECT row_to_json(s) FROM ({select}) AS s) TO STDOUT {ndjson}",
                        "/datasets/orders.ndjson"),
        "filtered": Query("filtered", f"\\copy ({filtered}) TO STDOUT {csv}",
                          f"/datasets/orders.csv?created_at=gte.{since}&order=id.desc"
                          f"&select={COLUMNS}"),
    }


def psql_bytes(url: str, copy: str) -> int:
    """The size of psql's output (also warms the cache before the timed runs)."""
    proc = subprocess.Popen(psql_command(url, copy), stdout=subprocess.PIPE, env=psql_env())
    assert proc.stdout is not None
    total = 0
    while block := proc.stdout.read(1 << 20):
        total += len(block)
    if proc.wait() != 0:
        raise RuntimeError(f"psql failed: {copy}")
    return total


def psql_contender(name: str, url: str, q: Query, size: int) -> Contender:
    command = psql_command(url, q.copy)
    shown = f'psql -c "{q.copy}" > /dev/null'

    def run() -> Run:
        return Run(timed(command, env=psql_env()), size)

    return Contender(name, shown, run, reference=True)


def curl_contender(name: str, server: Service, path: str, expect: int | None = None,
                   max_runs: int | None = None) -> Contender:
    def run() -> Run:
        r = curl(server.url + path)
        if r.status != 200:
            raise RuntimeError(f"{name}: HTTP {r.status}")
        if expect is not None and r.bytes != expect:
            raise RuntimeError(f"{name}: {r.bytes} bytes, psql wrote {expect}")
        return Run(r.seconds, r.bytes, first_byte=r.first_byte)

    return Contender(name, f"curl -o /dev/null '{path}'", run,
                     server_pid=lambda: server.pid, max_runs=max_runs)


def throughput_section(plan: Plan, url: str, server: Service, naive: Service,
                       log: Log) -> tuple[Section, list[Result]]:
    qs = queries(plan)
    log("exports: measuring psql's output sizes (and warming the cache)")
    sizes = {k: psql_bytes(url, q.copy) for k, q in qs.items()}
    contenders = [
        psql_contender("psql CSV", url, qs["csv"], sizes["csv"]),
        curl_contender("exporter CSV", server, qs["csv"].path, sizes["csv"]),
        psql_contender("psql NDJSON (row_to_json)", url, qs["ndjson"], sizes["ndjson"]),
        curl_contender("exporter NDJSON", server, qs["ndjson"].path, sizes["ndjson"]),
        psql_contender("psql filtered+ordered", url, qs["filtered"], sizes["filtered"]),
        curl_contender("exporter filtered+ordered", server, qs["filtered"].path,
                       sizes["filtered"]),
        # Several times slower: twice is enough to show it, even in the full run.
        curl_contender("naive SQLAlchemy + csv", naive, "/export/orders.csv", max_runs=2),
    ]
    log(f"exports: {plan.repetitions} interleaved rounds")
    results = interleaved(contenders, plan.repetitions, log)
    by_name = {r.contender.name: r for r in results}
    refs = {
        "exporter NDJSON": by_name["psql NDJSON (row_to_json)"],
        "exporter filtered+ordered": by_name["psql filtered+ordered"],
    }
    section = Section(f"Exports: {plan.demo_rows:,} rows of `exports.orders`")
    section.add(
        f"CSV is {sizes['csv'] / MB:,.0f} MB, NDJSON {sizes['ndjson'] / MB:,.0f} MB. Every "
        "exporter download was checked to be exactly as long as psql's output of the same "
        "query. Each contender's reference is the psql line above it; the ratio is the "
        "reference's median time over the contender's (1.00 = as fast as psql; the target "
        "is 0.9 or more). The naive endpoint's CSV is Python's rendering of the same rows "
        "(a few bytes longer per row); its ratio is against psql CSV.",
        "",
        f"The filtered export is `{qs['filtered'].path}`.",
        "",
        *results_table(results, by_name["psql CSV"], refs),
        "",
        "![exports](benchmarks/exports.png)",
        "",
    )
    bar_chart(plan.chart("exports"), f"Exports, {plan.demo_rows:,} rows", results)
    csv, psql = by_name["exporter CSV"], by_name["psql CSV"]
    nd = by_name["exporter NDJSON"]
    naive = by_name["naive SQLAlchemy + csv"]
    filtered = by_name["exporter filtered+ordered"]
    section.headline += [
        f"Exports of {plan.demo_rows:,} rows ({sizes['csv'] / MB:,.0f} MB of CSV): CSV at "
        f"**{ratio(csv, psql):.2f}×** psql `\\copy`'s throughput ({csv.throughput():,.0f} "
        f"against {psql.throughput():,.0f} MB/s), NDJSON at "
        f"**{ratio(nd, refs['exporter NDJSON']):.2f}×** psql of `row_to_json`, a filtered "
        f"and ordered export at {ratio(filtered, refs[filtered.contender.name]):.2f}×. "
        f"A tutorial-style SQLAlchemy + `csv` endpoint runs at {ratio(naive, psql):.2f}× psql: "
        f"exporter is **{naive.median_seconds / csv.median_seconds:.0f}× faster** than it.",
    ]
    return section, results


def first_byte(plan: Plan, server: Service, results: list[Result], log: Log
               ) -> tuple[float, float]:
    """Time to the first byte of the whole-table export (from its timed runs) and of a
    10-row one: they should be the same few milliseconds, whatever the table's size."""
    full = next(r for r in results if r.contender.name == "exporter CSV").first_byte
    assert full is not None
    small = statistics.median(curl(server.url + "/datasets/orders.csv?limit=10").first_byte
                              for _ in range(max(plan.repetitions, 3)))
    log(f"first byte: whole table {full * 1000:.1f} ms, 10 rows {small * 1000:.1f} ms")
    return full, small


def first_byte_lines(plan: Plan, full: float, small: float) -> list[str]:
    return [
        "| export | time to first byte (median, curl's `time_starttransfer`) |",
        "|---|---|",
        f"| `/datasets/orders.csv` ({plan.demo_rows:,} rows) | {fmt_seconds(full)} |",
        f"| `/datasets/orders.csv?limit=10` | {fmt_seconds(small)} |",
    ]


def memory_section(plan: Plan, url: str, log: Log) -> Section:
    """A fresh server per export, so its VmHWM is that export's peak and nothing else's."""
    path = f"/datasets/{GENERATED_VIEW}.csv"
    cases = [(f"{plan.small_rows:,} rows", f"{path}?limit={plan.small_rows}"),
             (f"{plan.generated_rows:,} rows", path)]
    peaks: dict[str, list[int]] = {name: [] for name, _ in cases}
    idle: list[int] = []
    sizes: dict[str, int] = {}
    rounds = 1 if plan.quick else 2  # each is two server starts
    for rep in range(rounds):
        for name, target in cases:
            with exporter_service(plan, url, f"memory-{rep}") as server:
                server.start("/healthz")
                curl(server.url + "/datasets")  # the catalog loaded, as in real use
                idle.append(peak_rss_hwm(server.pid))
                r = curl(server.url + target)
                sizes[name] = r.bytes
                peaks[name].append(peak_rss_hwm(server.pid))
                log(f"  memory {name}: {r.bytes / MB:.0f} MB in {r.seconds:.1f} s, "
                    f"peak RSS {peaks[name][-1] / 2**20:.1f} MiB")
    small, large = (statistics.median(peaks[name]) for name, _ in cases)
    growth = large / small
    section = Section("Exports: server memory against export size")
    section.add(
        f"A fresh `exporter serve` per export; its peak RSS (VmHWM) after the download. "
        f"The large export reads `exports.{GENERATED_VIEW}`, a view over "
        f"`generate_series` with {plan.generated_rows:,} rows (loading a table that big would "
        "take minutes and gigabytes of disk, and the server cannot tell the difference); the "
        f"small one is the same view with `?limit={plan.small_rows}`. {rounds} round(s), median. "
        "Target: within 10%.",
        "",
        "| export | body | server peak RSS |",
        "|---|---|---|",
        f"| none (started, catalog read) | | {fmt_bytes(int(statistics.median(idle)))} |",
        *(f"| {name} | {sizes[name] / MB:,.0f} MB | "
          f"{fmt_bytes(int(statistics.median(peaks[name])))} |" for name, _ in cases),
        "",
        f"Large over small: **{growth:.3f}** ({'within' if growth <= 1.10 else 'NOT within'} "
        "10%).",
    )
    section.headline.append(
        f"Server peak RSS for {plan.generated_rows:,} rows: "
        f"{fmt_bytes(int(large))}, against {fmt_bytes(int(small))} for {plan.small_rows:,} rows "
        f"(**{growth:.3f}×**).")
    return section


def concurrent_section(plan: Plan, server: Service, expect: int, log: Log) -> Section:
    n = plan.concurrent_exports
    baseline = tree_rss(server.pid)
    bound = baseline + n * 4 * 2**20
    log(f"exports: {n} concurrent full-table downloads")
    with RssSampler(server.pid) as rss:
        seconds, outputs = curls_at_once([[server.url + "/datasets/orders.csv"]] * n)
    complete = sum(1 for o in outputs if o == [str(expect), "200"])
    total = sum(int(o[0]) for o in outputs if o)
    section = Section(f"Exports: {n} concurrent downloads of the whole table")
    section.add(
        f"{n} `curl` processes at once, each the whole `orders.csv`; one round (it is "
        f"{n}× the single download). Stated bound: the idle server's RSS plus 4 MiB per "
        "export (each holds at most 9 chunks of 64 KiB, plus asyncpg's and the socket's "
        "buffers).",
        "",
        "| downloads complete | wall time | total | aggregate throughput | server RSS idle | "
        "server peak RSS | bound |",
        "|---|---|---|---|---|---|---|",
        f"| {complete}/{n} | {fmt_seconds(seconds)} | {total / MB:,.0f} MB | "
        f"{total / seconds / MB:,.0f} MB/s | {fmt_bytes(baseline)} | {fmt_bytes(rss.peak)} | "
        f"{fmt_bytes(bound)} ({'met' if rss.peak <= bound else 'NOT met'}) |",
    )
    section.headline.append(
        f"{n} concurrent whole-table exports: {complete}/{n} complete, "
        f"{total / seconds / MB:,.0f} MB/s in all, server peak RSS {fmt_bytes(rss.peak)} "
        f"(idle {fmt_bytes(baseline)}; stated bound {fmt_bytes(bound)}).")
    return section


def _copy_progress(url: str, pid: int) -> int | None:
    """Bytes a backend's COPY has handed to its socket (PostgreSQL's own progress report,
    `pg_stat_progress_copy.bytes_processed`; exact to libpq's 8 KiB send buffer).

    /proc/PID/io's wchar would be simpler but does not count send() on sockets."""
    rows = fetch(url, "SELECT bytes_processed FROM pg_stat_progress_copy WHERE pid = $1", pid)
    return int(rows[0]["bytes_processed"]) if rows else None


def _copy_backend(url: str, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = fetch(url, "SELECT pid FROM pg_stat_activity WHERE application_name = "
                          "'exporter' AND state = 'active' AND query LIKE 'COPY (SELECT%' "
                          "AND query NOT LIKE '%LIMIT 0)%'")
        if rows:
            return int(rows[0]["pid"])
        time.sleep(0.02)
    raise RuntimeError("no COPY backend found for the slow client")


def _tcp_queued(port: int) -> int:
    """Bytes waiting in the kernel's loopback TCP queues between the server and curl."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True, text=True, check=False).stdout
    return sum(int(f[0]) + int(f[1]) for f in (line.split() for line in out.splitlines())
               if len(f) >= 2 and f[0].isdigit())


def slow_client_section(plan: Plan, url: str, server: Service, log: Log) -> Section:
    """`curl --limit-rate 1M`: the server's RSS should stay flat, and what PostgreSQL has
    sent but the client not yet received should stay bounded (8 chunks of 64 KiB in the
    server, plus the sockets' buffers)."""
    seconds = plan.slow_client_seconds
    log(f"exports: slow client for {seconds:g} s")
    path = f"/datasets/{GENERATED_VIEW}.csv"
    # (t, server RSS, bytes PostgreSQL sent that curl has not saved, of them in TCP queues)
    samples: list[tuple[float, int, int, int]] = []
    with tempfile.TemporaryDirectory(dir=plan.work) as tmp:
        out = Path(tmp) / "slow.csv"
        proc = subprocess.Popen(["curl", "-sS", "--limit-rate", "1M", "-o", str(out),
                                 server.url + path])
        try:
            backend = _copy_backend(url)
            start = time.monotonic()
            while (t := time.monotonic() - start) < seconds and proc.poll() is None:
                sent = _copy_progress(url, backend)
                if sent is None:  # the COPY ended: everything is in flight or received
                    break
                received = out.stat().st_size if out.exists() else 0
                samples.append((t, tree_rss(server.pid), sent - received,
                                _tcp_queued(server.port)))
                time.sleep(0.25)
        finally:
            proc.terminate()
            proc.wait()
    if not samples:
        raise RuntimeError("the slow client finished before the first sample")
    rss = [s[1] for s in samples]
    ahead = [s[2] for s in samples]
    in_tcp = [s[3] for s in samples]
    line_chart(plan.chart("slow-client"), "Slow client (curl --limit-rate 1M)", {
        "server RSS (MiB)": [(s[0], s[1] / 2**20) for s in samples],
        "PostgreSQL ahead of the client (MiB)": [(s[0], s[2] / 2**20) for s in samples],
        "of it in loopback TCP queues (MiB)": [(s[0], s[3] / 2**20) for s in samples],
    }, "MiB")
    section = Section("Exports: a slow client")
    section.add(
        f"`curl --limit-rate 1M` on `{path}` for {seconds:g} s, sampled every 0.25 s. "
        "*Ahead* is what the PostgreSQL backend had sent (`pg_stat_progress_copy."
        "bytes_processed`) minus what curl had saved. Of it, *in TCP* is what sat in the "
        "loopback TCP queues between the server and curl (`ss` Recv-Q + Send-Q); the "
        "rest is in the server (at most 8 × 64 KiB queued plus one chunk being filled, "
        "plus asyncpg's and uvicorn's buffers) and in the unix socket from PostgreSQL. "
        "curl's rate limit averages over the transfer, so it reads in bursts.",
        "",
        "| samples | server RSS first | server RSS last | server RSS min–max | ahead: median | "
        "ahead: max | in TCP: max | ahead minus in TCP: max |",
        "|---|---|---|---|---|---|---|---|",
        f"| {len(samples)} | {fmt_bytes(rss[0])} | {fmt_bytes(rss[-1])} | "
        f"{fmt_bytes(min(rss))} – {fmt_bytes(max(rss))} | "
        f"{fmt_bytes(int(statistics.median(ahead)))} | {fmt_bytes(max(ahead))} | "
        f"{fmt_bytes(max(in_tcp))} | "
        f"{fmt_bytes(max(a - q for a, q in zip(ahead, in_tcp, strict=True)))} |",
        "",
        "![slow client](benchmarks/slow-client.png)",
    )
    section.headline.append(
        f"A client at 1 MB/s for {seconds:g} s: server RSS {fmt_bytes(min(rss))}–"
        f"{fmt_bytes(max(rss))}; PostgreSQL at most {fmt_bytes(max(ahead))} ahead of the "
        f"client, of which {fmt_bytes(max(in_tcp))} in loopback TCP queues.")
    return section


def run(plan: Plan, url: str, log: Log) -> tuple[list[Section], list[str]]:
    """All export benchmarks; returns the sections and the first-byte table for the
    start-up section."""
    with exporter_service(plan, url, "exporter") as server, naive_service(plan, url) as naive:
        server.start("/healthz")
        naive.start("/healthz")
        throughput, results = throughput_section(plan, url, server, naive, log)
        full, small = first_byte(plan, server, results, log)
        throughput.headline.append(
            f"Time to the first byte of the whole-table export: {fmt_seconds(full)} "
            f"(of a 10-row export: {fmt_seconds(small)}).")
        expect = next(r for r in results if r.contender.name == "exporter CSV").bytes
        concurrent = concurrent_section(plan, server, expect, log)
        slow = slow_client_section(plan, url, server, log)
    memory = memory_section(plan, url, log)
    return [throughput, memory, concurrent, slow], first_byte_lines(plan, full, small)
