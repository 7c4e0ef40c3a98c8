"""Unit tests of exporter/exports/copy.py: the chunks of a COPY leave in the order they came.

Issue 22: `test_httpx_decodes_both_codings[embedded-zstd]` once got an export whose bytes
differed from a second one deep in the body, under load. The cause was here: a partial
chunk sent after the flush interval overtook a full one queued while that wait timed out.
"""

from __future__ import annotations

import asyncio
import time

from exporter.exports.copy import CopyStream, Output

FLUSH = 0.05
CHUNK = 1024


def test_a_partial_chunk_never_overtakes_a_queued_one() -> None:
    """The producer queues a full chunk, then starts a partial one, in the loop turn where
    the consumer's wait for the queue times out (a loaded machine: the loop was late)."""

    async def go() -> list[bytes]:
        release = asyncio.Event()

        async def producer(prelude: Output, output: Output) -> int:
            await output(b"a")  # the first piece goes at once
            await release.wait()
            await output(b"b" * CHUNK)  # a full chunk: queued
            await output(b"c")  # a partial one: pending, for the flush
            await asyncio.sleep(4 * FLUSH)  # the flush sends it, not the end
            return 3

        stream = CopyStream(producer, chunk_size=CHUNK, max_chunks=8, flush_interval=FLUSH)
        stream.start()
        got = [await stream.next_chunk()]
        waiting = asyncio.create_task(stream.next_chunk())
        for _ in range(3):  # into wait_for, its get() waiting on the empty queue
            await asyncio.sleep(0)
        # Due just after the consumer's flush timer; the loop runs both in one turn.
        asyncio.get_running_loop().call_later(FLUSH + 0.01, release.set)
        # Blocks the loop on purpose: it is late, as on a loaded machine.
        time.sleep(3 * FLUSH)  # noqa: ASYNC251
        got.append(await waiting)
        while (chunk := await stream.next_chunk()) is not None:
            got.append(chunk)
        return [c for c in got if c is not None]

    chunks = asyncio.run(go())
    assert b"".join(chunks) == b"a" + b"b" * CHUNK + b"c", [c[:4] for c in chunks]


def test_a_cancellation_as_a_chunk_arrives_is_not_swallowed() -> None:
    """The consumer is cancelled in the loop turn where the producer queues a chunk for
    it. Python 3.11's asyncio.wait_for then returned the chunk and dropped the
    cancellation, so a time limit around the reads (a resume copy's
    EXPORTER_EXPORTS_RESUME_FINISH) never ended them: seen once in a full run, an endless
    export read on for a minute past its 4 s. The chunk stays queued for the next read."""

    async def go() -> tuple[bool, bytes | None]:
        release = asyncio.Event()
        consumer: asyncio.Task[bytes | None] | None = None

        async def producer(prelude: Output, output: Output) -> int:
            await output(b"a")
            await release.wait()
            await output(b"b" * CHUNK)  # queued without waiting (the queue has room)...
            assert consumer is not None
            consumer.cancel()  # ...and the consumer cancelled in the same turn
            await asyncio.sleep(3600)
            return 0

        stream = CopyStream(producer, chunk_size=CHUNK, max_chunks=8, flush_interval=60)
        stream.start()
        assert await stream.next_chunk() == b"a"
        consumer = asyncio.ensure_future(stream.next_chunk())
        for _ in range(3):
            await asyncio.sleep(0)  # the consumer waits on the empty queue
        release.set()
        try:
            await consumer
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        after = None
        try:
            async with asyncio.timeout(2):
                after = await stream.next_chunk()
        except TimeoutError:
            pass  # the chunk was taken by the read that should have been cancelled
        await stream.cancel()
        return cancelled, after

    cancelled, after = asyncio.run(go())
    assert cancelled
    assert after == b"b" * CHUNK
