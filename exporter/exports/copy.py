"""COPY output to HTTP body: coalesced chunks through a bounded queue.

PostgreSQL's COPY hands asyncpg many small pieces. They are gathered into chunks
of `chunk_size` bytes and put on a queue of at most `max_chunks`; when the client
is slow the queue fills, the COPY callback waits on it, asyncpg stops reading the
socket, and the backend waits in ClientWrite. Memory per export is thus bounded by
about `chunk_size * (max_chunks + 1)`, whatever the size of the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from exporter import metrics

Output = Callable[[bytes], Awaitable[None]]
# Called with (prelude, output): what goes to `prelude` (a CSV header, say) waits and
# leaves with the first data written to `output`, or at the end if there is none.
Producer = Callable[[Output, Output], Awaitable[int | None]]


class StreamStopped(Exception):
    """The stream was stopped (`stop`) while its consumer read it."""


@dataclass
class _Failure:
    error: BaseException


_END = object()


class CopyStream:
    """Runs `producer` (which writes through the output callback) in its own task."""

    def __init__(
        self, producer: Producer, *, chunk_size: int, max_chunks: int, flush_interval: float
    ) -> None:
        self._producer = producer
        self._chunk_size = chunk_size
        self._flush_interval = flush_interval
        self._queue: asyncio.Queue[object] = asyncio.Queue(max_chunks)
        self._pending = bytearray()
        self._first_sent = False
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._abandoned = False  # cut: nobody reads what the producer ends with
        self.result: int | None = None  # what the producer returned (rows)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _prelude(self, data: bytes) -> None:
        self._pending += data

    async def _output(self, data: bytes) -> None:
        self._pending += data
        # The first piece goes at once: the first byte should not wait for a full chunk.
        if len(self._pending) >= self._chunk_size or not self._first_sent:
            self._first_sent = True
            await self._queue.put(self._take())

    def _take(self) -> bytes:
        chunk = bytes(self._pending)
        self._pending.clear()
        return chunk

    async def _run(self) -> None:
        started = time.monotonic()
        try:
            self.result = await self._producer(self._prelude, self._output)
            metrics.copy_ended(self.result, time.monotonic() - started)
            self._first_sent = True
            if self._pending:
                await self._queue.put(self._take())
            await self._queue.put(_END)
        except Exception as error:  # handed to the consumer, which decides what it means
            metrics.copy_ended(None, time.monotonic() - started)
            if not self._abandoned:  # else no consumer: a full queue would wait forever
                await self._queue.put(_Failure(error))

    async def next_chunk(self) -> bytes | None:
        """The next chunk, or None at the end; re-raises the producer's failure.

        A partial chunk that waited `flush_interval` is sent as it is. (The wait for the
        first one is bounded by its caller: exports/export.py, EXPORTER_STATEMENT_TIMEOUT.)
        """
        while True:
            if self._stopped:
                raise StreamStopped
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    # Not asyncio.wait_for: in Python 3.11 it swallows a cancellation that
                    # comes as the queue hands over an item, and a resume copy's time
                    # limit (an asyncio.timeout around this) then never ended its read.
                    async with asyncio.timeout(self._flush_interval):
                        item = await self._queue.get()
                except TimeoutError:
                    # A chunk queued while the wait timed out holds older bytes than the
                    # pending ones: it goes first (the loop takes it), never after them.
                    if self._pending and self._first_sent and self._queue.empty():
                        return self._take()
                    continue
            if item is _END:
                return None
            if isinstance(item, _Failure):
                raise item.error
            assert isinstance(item, bytes)
            return item

    @property
    def running(self) -> bool:
        """Whether the producer is still at work."""
        return self._task is not None and not self._task.done()

    def cut(self, close: Callable[[], None]) -> None:
        """Cancel the producer, its COPY's connection closed by `close` in the same step
        of the loop; nobody reads its outcome any more (then `cancel` waits for it).

        asyncpg 0.32's COPY, its task cancelled after the next data came in but before
        the task took it, raises CancelledError with no cancel request sent and reads
        its socket again: the rest of the COPY's output then fails in its protocol
        ("Fatal error on transport ... AttributeError: 'NoneType' object has no
        attribute 'cancelled'", logged by asyncio at ERROR). Closed in the same step, no
        more of it is read. A closed connection may turn the cancellation into a
        connection error: the producer, abandoned, then does not wait to hand it on."""
        self._abandoned = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            close()

    def stop(self) -> None:
        """Cancel the producer without waiting; its consumer gets StreamStopped (within a
        flush interval)."""
        self._stopped = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def cancel(self) -> bool:
        """Stop the producer (asyncpg then asks PostgreSQL to cancel the query); whether
        it was still running."""
        self._abandoned = True
        if self._task is None or self._task.done():
            return False
        self._task.cancel()
        # Its outcome no longer matters to anyone.
        with contextlib.suppress(BaseException):
            await self._task
        return True
