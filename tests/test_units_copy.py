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
