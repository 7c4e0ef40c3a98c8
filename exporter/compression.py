"""Content codings (gzip, zstd): which one a request accepts, and a body compressed
chunk by chunk in worker threads.

zlib and zstd release the GIL while they compress, so the work runs on another core
while the event loop reads the next chunk (one chunk in flight per body: a compressor
is stateful, and its calls must follow each other). Memory stays bounded by a chunk or
two per body, whatever the size of the whole.
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import zstandard

from exporter.streaming import Chunk

# A body that produced no compressed byte for this long gets a flush: a query that
# trickles rows still shows progress through a compressed answer.
FLUSH_AFTER = 1.0

# As many threads as cores: the work is CPU-bound, more threads only queue in the kernel.
_CORES = os.cpu_count() or 2
_POOL = ThreadPoolExecutor(max_workers=_CORES, thread_name_prefix="exporter-compress")
# The input of one zstd worker's job when a body is compressed by several (`threads`).
JOB_SIZE = 1 << 20


class Compressor(Protocol):
    def compress(self, data: bytes, flush: bool) -> bytes:
        """Compressed bytes for `data` so far; with `flush`, all that `data` needs."""

    def finish(self) -> bytes:
        """The rest of the stream, its trailer included."""


class _Gzip:
    def __init__(self, level: int, threads: int = 1) -> None:
        # `threads` is not used: deflate has no multi-threaded mode in zlib.
        # wbits 31: the gzip wrapper (header and CRC trailer), not raw zlib.
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def compress(self, data: bytes, flush: bool) -> bytes:
        out = self._z.compress(data)
        return out + self._z.flush(zlib.Z_SYNC_FLUSH) if flush else out

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class _Zstd:
    def __init__(self, level: int, threads: int = 1) -> None:
        workers = min(threads, _CORES)
        if workers > 1:
            # zstd's own workers, each compressing a job of JOB_SIZE while this thread
            # hands over the next chunks. Small jobs: its default (8 MiB at level 3) held
            # 39-76 MiB per body with 1-4 workers, 1 MiB jobs 6-12 MiB, at the same ratio.
            params = zstandard.ZstdCompressionParameters.from_level(
                level, threads=workers, job_size=JOB_SIZE)
            compressor = zstandard.ZstdCompressor(compression_params=params)
        else:
            compressor = zstandard.ZstdCompressor(level=level)
        self._z = compressor.compressobj()

    def compress(self, data: bytes, flush: bool) -> bytes:
        out = self._z.compress(data)
        return out + self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) if flush else out

    def finish(self) -> bytes:
        return self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


@dataclass(frozen=True)
class Coding:
    name: str  # the content-coding token of Accept-Encoding and Content-Encoding
    extension: str  # of a file in this coding: orders.csv.gz
    media_type: str  # of a file in this coding, served as itself
    _new: Callable[[int, int], Compressor]
    default_level: int

    def compressor(self, level: int | None = None, threads: int = 1) -> Compressor:
        """`threads` above 1: zstd compresses in that many threads of its own (at most
        one per core), for a body that comes faster than one core compresses (an export
        read by several backends); its bytes then differ from one thread's, not what they
        decode to. gzip compresses in one thread whatever it is told."""
        return self._new(self.default_level if level is None else level, threads)


# Fastest first: among codings a client accepts equally, the first one here wins.
ZSTD = Coding("zstd", "zst", "application/zstd", _Zstd, 3)
GZIP = Coding("gzip", "gz", "application/gzip", _Gzip, 1)
CODINGS: tuple[Coding, ...] = (ZSTD, GZIP)
IDENTITY = "identity"


def by_name(name: str) -> Coding | None:
    return next((c for c in CODINGS if c.name == name.lower()), None)


def by_extension(extension: str) -> Coding | None:
    return next((c for c in CODINGS if c.extension == extension.lower()), None)


def _qvalue(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def negotiate(accept_encoding: str | None, offered: tuple[Coding, ...] = CODINGS,
              ) -> Coding | None:
    """The coding to send for this Accept-Encoding (RFC 9110 §12.5.3), None for identity.

    Identity is always an answer here, even when the header refuses it: the body is
    the same data, and a 406 for a download helps nobody.
    """
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding[:4096].split(",")[:64]:
        token, *params = item.split(";")
        token = token.strip().lower()
        if token:
            weights[token] = _qvalue(params)
    star = weights.get("*", 0.0)
    best: Coding | None = None
    best_q = 0.0
    for coding in offered:
        q = weights.get(coding.name, star)
        if q > best_q:
            best, best_q = coding, q
    return best


async def compressed(chunks: AsyncIterator[Chunk], coding: Coding,
                     level: int | None = None, flush_below: int = 0, threads: int = 1,
                     ) -> AsyncGenerator[bytes, None]:
    """`chunks` compressed with `coding`: the compressing runs in a worker thread while
    the next chunk is read (with `threads` above 1, zstd's own threads compress and the
    worker thread only hands them the chunks: Coding.compressor). Empty outputs are not
    yielded.

    A chunk shorter than `flush_below` means its source is trickling (an export sends a
    partial chunk only after a pause): it is flushed and sent at once, not held until
    the next chunk comes, which may be minutes later.

    A failure of `chunks` propagates (the response is cut, no trailer is written, so
    the client's decoder sees a truncated stream); closing this closes `chunks` too.
    """
    loop = asyncio.get_running_loop()
    compressor = coding.compressor(level, threads)
    pending: asyncio.Future[bytes] | None = None
    last_out = time.monotonic()
    try:
        async for chunk in chunks:
            if pending is not None and (out := await pending):
                last_out = time.monotonic()
                yield out
            trickle = len(chunk) < flush_below
            flush = trickle or time.monotonic() - last_out > FLUSH_AFTER
            pending = loop.run_in_executor(_POOL, compressor.compress, bytes(chunk), flush)
            if trickle:
                out, pending = await pending, None
                if out:
                    last_out = time.monotonic()
                    yield out
        if pending is not None and (out := await pending):
            yield out
        yield await loop.run_in_executor(_POOL, compressor.finish)
    finally:
        # Its source's own clean-up (a file body's budget, an export's row count) must
        # not wait for the garbage collector.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def accepted(enabled: bool, accept_encoding: str | None) -> Coding | None:
    """The coding for a response: None when compression is off or the client takes none."""
    return negotiate(accept_encoding) if enabled else None


def level_of(coding: Coding, gzip_level: int, zstd_level: int) -> int:
    return gzip_level if coding is GZIP else zstd_level if coding is ZSTD else \
        coding.default_level


def coded_etag(etag: str, coding: Coding | None) -> str:
    """The ETag of `coding`'s representation of what `etag` tags (`"abc"` ->
    `"abc-gzip"`, as Apache's mod_deflate): caches never take one for the other."""
    if coding is None or not etag.endswith('"'):
        return etag
    return f'{etag[:-1]}-{coding.name}"'


def compressible(media_type: str, patterns: list[str]) -> bool:
    """Whether `media_type` (parameters ignored) matches one of `patterns` (`text/*`,
    `application/json`)."""
    kind = media_type.split(";", 1)[0].strip().lower()
    major = kind.split("/", 1)[0]
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern == kind or (pattern.endswith("/*") and pattern[:-2] == major):
            return True
    return False
