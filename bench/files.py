"""Files against nginx (sendfile, the physical limit) and Starlette's FileResponse.

The exporter's `/files/{path}` route is measured, started with EXPORTER_FILES_ROOT at the
benchmark's folder; it must first answer a Range request for the big file with 206.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from bench.exports import exporter_service
from bench.harness import (
    Contender,
    MiB,
    Plan,
    Result,
    Run,
    Section,
    Service,
    bar_chart,
    curl,
    curls_at_once,
    fmt_bytes,
    free_port,
    interleaved,
    ratio,
    results_table,
)

Log = Callable[[str], None]
FILE_NAME = "big.bin"
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    {http}
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        {files}
        location = /healthz {{ return 200 "ok"; }}
    }}
}}
"""


def make_file(path: Path, size: int) -> None:
    """A file of random-looking bytes, made fast by repeating one random 4 MiB block
    (no compression happens anywhere on the way, so repetition changes nothing)."""
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 * MiB)
    with path.open("wb") as f:
        written = 0
        while written < size:
            written += f.write(block[: size - written])


def warm(path: Path) -> None:
    """Read the file once, so every contender is served from the page cache."""
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass


@contextmanager
def nginx(plan: Plan, root: Path, files: str | None = None, http: str = "",
          name: str = "nginx") -> Iterator[Service]:
    """nginx in the foreground on a free loopback port, with a generated config and its
    own pid and log files in a temporary folder; stopped (and the folder removed) after.
    `files` replaces the `/files/` location (by default an alias of `root`), `http` is
    added to the `http` block."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="nginx-", dir=plan.work) as tmp:
        port = free_port()
        # As root, workers would switch to `nobody`, who may not read our folder.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = Path(tmp) / "nginx.conf"
        files = files if files is not None else f"location /files/ {{ alias {root}/; }}"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, user=user, files=files,
                                          http=http))
        service = Service(name, [binary, "-p", tmp, "-c", str(conf), "-e",
                                 f"{tmp}/error.log"], plan.logs / f"{name}.log", port=port)
        try:
            yield service.start("/healthz")
        finally:
            service.stop()


def python_app(plan: Plan, root: Path) -> Service:
    port = free_port()
    return Service("fileresponse", [
        sys.executable, "-m", "uvicorn", "bench.fileresponse_app:app", "--port", str(port),
        "--no-access-log", "--log-level", "warning",
    ], plan.logs / "fileresponse.log", env={"BENCH_FILES_ROOT": str(root)}, port=port)


def check_exporter_files(server: Service, size: int) -> None:
    """The exporter serves the benchmark's file, ranges included, before it is measured."""
    r = httpx.get(f"{server.url}/files/{FILE_NAME}", headers={"Range": "bytes=0-0"}, timeout=10)
    if r.status_code != 206 or r.headers.get("content-range") != f"bytes 0-0/{size}":
        raise RuntimeError(f"/files answered {r.status_code} {r.headers} to a Range request")


# --- contenders ----------------------------------------------------------------------


def single(name: str, server: Service, path: str, size: int, reference: bool = False
           ) -> Contender:
    def run() -> Run:
        r = curl(server.url + path)
        if r.status != 200 or r.bytes != size:
            raise RuntimeError(f"{name}: HTTP {r.status}, {r.bytes} of {size} bytes")
        return Run(r.seconds, r.bytes, first_byte=r.first_byte)

    return Contender(name, f"curl -o /dev/null '{path}'", run, server_pid=lambda: server.pid,
                     reference=reference)


def ranges(plan: Plan) -> list[tuple[int, int]]:
    """Byte ranges of the concurrent clients, spread over the file (they overlap when
    the file is smaller than clients × range size, as in the quick run)."""
    span = plan.file_size - plan.range_size
    step = max(span // max(plan.range_clients - 1, 1), 1)
    return [((i * step) % (span + 1), (i * step) % (span + 1) + plan.range_size - 1)
            for i in range(plan.range_clients)]


def concurrent(name: str, server: Service, plan: Plan, reference: bool = False) -> Contender:
    """`range_clients` curl processes at once, each one Range: wall time to the last."""
    url = f"{server.url}/files/{FILE_NAME}"

    def run() -> Run:
        seconds, outputs = curls_at_once([["-r", f"{a}-{b}", url] for a, b in ranges(plan)])
        bad = [o for o in outputs if o != [str(plan.range_size), "206"]]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} range downloads went wrong: {bad[:3]}")
        return Run(seconds, plan.range_size * plan.range_clients)

    command = (f"{plan.range_clients} × curl -r a-b '/files/{FILE_NAME}' "
               f"({fmt_bytes(plan.range_size)} each)")
    return Contender(name, command, run, server_pid=lambda: server.pid, reference=reference)


def resume(name: str, server: Service, plan: Plan, scratch: Path, reference: bool = False
           ) -> Contender:
    """`wget -c` of a file whose first half is already there (a sparse stand-in: wget
    only looks at its length)."""
    url = f"{server.url}/files/{FILE_NAME}"
    half = plan.file_size // 2

    def run() -> Run:
        part = scratch / f"resume-{name.replace(' ', '-')}.bin"
        with part.open("wb") as f:
            f.truncate(half)
        try:
            start = time.monotonic()
            subprocess.run(["wget", "-c", "-q", "-O", str(part), url], check=True)
            seconds = time.monotonic() - start
            if part.stat().st_size != plan.file_size:
                raise RuntimeError(f"{name}: resumed to {part.stat().st_size} bytes")
        finally:
            part.unlink(missing_ok=True)
        return Run(seconds, plan.file_size - half)

    return Contender(name, f"wget -c '/files/{FILE_NAME}' (last half)", run,
                     server_pid=lambda: server.pid, reference=reference)


def scratch_dir(plan: Plan) -> Path:
    """Where wget writes: memory when there is a tmpfs big enough, so that the disk is
    not what gets measured."""
    shm = Path("/dev/shm")
    usable = shm.is_dir() and os.access(shm, os.W_OK)
    if usable and shutil.disk_usage(shm).free > 2 * plan.file_size:
        return shm
    return plan.work


# --- the benchmark -------------------------------------------------------------------


def run(plan: Plan, url: str, log: Log) -> list[Section]:
    root = plan.work / "files"
    path = root / FILE_NAME
    log(f"files: preparing a {fmt_bytes(plan.file_size)} file")
    make_file(path, plan.file_size)
    warm(path)
    with ExitStack() as stack:
        ref = stack.enter_context(nginx(plan, root))
        py = stack.enter_context(python_app(plan, root))
        py.start("/healthz")
        ex = stack.enter_context(
            exporter_service(plan, url, "exporter-files", {"EXPORTER_FILES_ROOT": str(root)}))
        ex.start("/healthz")
        check_exporter_files(ex, plan.file_size)
        return [
            _single_section(plan, ref, py, ex, log),
            _concurrent_section(plan, ref, py, ex, log),
            _resume_section(plan, ref, py, ex, log),
        ]


def _section(plan: Plan, title: str, chart: str, intro: str,
             results: list[Result]) -> Section:
    section = Section(title)
    section.add(intro, "", *results_table(results, results[0]), "",
                f"![{chart}](benchmarks/{chart}.png)")
    bar_chart(plan.chart(chart), title, results)
    reference = results[0]
    parts = [f"{r.contender.name} {ratio(r, reference):.2f}×" for r in results[1:]]
    section.headline.append(
        f"{title}: nginx {reference.throughput():,.0f} MB/s; " + ", ".join(parts) + ".")
    return section


def _single_section(plan: Plan, ref: Service, py: Service, ex: Service,
                    log: Log) -> Section:
    size = plan.file_size
    path = f"/files/{FILE_NAME}"
    contenders = [
        single("nginx (sendfile)", ref, path, size, reference=True),
        single("exporter", ex, path, size),
        single("Starlette FileResponse", py, path, size),
        single("aiofiles, 64 KiB chunks", py, f"/aiofiles/64/{FILE_NAME}", size),
        single("aiofiles, 1 MiB chunks", py, f"/aiofiles/1024/{FILE_NAME}", size),
    ]
    log("files: single stream")
    results = interleaved(contenders, plan.repetitions, log)
    return _section(
        plan, f"Files: one {fmt_bytes(size)} download", "files-single",
        "Page cache warm; one `curl` at a time. nginx runs one worker process (as uvicorn "
        "does here) with `sendfile on`. The aiofiles lines are a plain `StreamingResponse` "
        "over `aiofiles` reads in the benchmark's own app, to show what the chunk size does "
        "under uvicorn (which supports neither `http.response.pathsend` nor "
        "`zerocopysend`, so `os.sendfile` cannot be reached from an ASGI app on it). "
        "Target: exporter at least 0.8× nginx, far ahead of FileResponse.",
        results)


def _concurrent_section(plan: Plan, ref: Service, py: Service, ex: Service,
                        log: Log) -> Section:
    contenders = [concurrent("nginx (sendfile)", ref, plan, reference=True),
                  concurrent("exporter", ex, plan),
                  concurrent("Starlette FileResponse", py, plan)]
    log(f"files: {plan.range_clients} concurrent range clients")
    results = interleaved(contenders, plan.repetitions, log)
    return _section(
        plan, f"Files: {plan.range_clients} concurrent range clients", "files-concurrent",
        f"{plan.range_clients} `curl -r a-b` processes at once, each {fmt_bytes(plan.range_size)}"
        " at its own offset; each answer checked to be a 206 of the right length. Time is "
        "from the first start to the last exit. Target: exporter at least 0.8× nginx, with "
        "server RSS under 256 MiB (stated bound: the idle server plus about 1.5 MiB per "
        "client at 1 MiB chunks).",
        results)


def _resume_section(plan: Plan, ref: Service, py: Service, ex: Service,
                    log: Log) -> Section:
    scratch = scratch_dir(plan)
    contenders = [resume("nginx (sendfile)", ref, plan, scratch, reference=True),
                  resume("exporter", ex, plan, scratch),
                  resume("Starlette FileResponse", py, plan, scratch)]
    log("files: wget -c resume of the last half")
    results = interleaved(contenders, plan.repetitions, log)
    return _section(
        plan, "Files: `wget -c` resume of the last half", "files-resume",
        f"The first half already on disk (wget writes to `{scratch}`); wget sends "
        "`Range: bytes=N-` and appends. Each result checked to be the full length.",
        results)
