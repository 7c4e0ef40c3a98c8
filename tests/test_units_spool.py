"""The spool of a parallel export's ranges ahead (exporter/exports/parallel.py): what is
written comes out in order, through memory and a real temporary file, and a writer whose
spool is full waits."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from exporter.config import Settings
from exporter.db import on_this_host
from exporter.exports.parallel import Spool, _cores_to_spare

PIECE = 16 * 1024
BOUND = 32 * 1024 + 64 * 1024  # the memory and the file of the full spool below


@pytest.mark.parametrize("disk", [0, 64 * 1024, 256 * 1024])
def test_what_is_written_comes_out_in_order(tmp_path: Path, disk: int) -> None:
    rng = random.Random(disk)

    async def one(size: int) -> None:
        spool = Spool(32 * 1024, disk, tmp_path, PIECE)
        data = rng.randbytes(size)

        async def write() -> None:
            at = 0
            while at < len(data):
                step = rng.randint(1, 70_000)
                await spool.write(data[at:at + step])
                at += step
            spool.end()

        writer = asyncio.ensure_future(write())
        got = bytearray()
        async for piece in spool.pieces():
            assert 0 < len(piece) <= max(PIECE, 70_000)
            got += piece
            if rng.random() < 0.3:
                await asyncio.sleep(0.0005)  # a slow reader: the spool fills
        await writer
        spool.close()
        assert bytes(got) == data

    async def all_sizes() -> None:
        for size in (0, 1, 40_000, 700_000, 1_500_000):
            await one(size)

    asyncio.run(all_sizes())
    assert list(tmp_path.iterdir()) == []  # the files had no name


def test_a_full_spool_makes_its_writer_wait(tmp_path: Path) -> None:
    async def go() -> int:
        spool = Spool(32 * 1024, 64 * 1024, tmp_path, PIECE)
        written = 0
        full = asyncio.Event()

        async def write() -> None:
            nonlocal written
            while True:
                await spool.write(b"x" * 4096)
                written += 4096
                if written >= BOUND:
                    full.set()

        writer = asyncio.ensure_future(write())
        await asyncio.wait_for(full.wait(), 20)
        await asyncio.sleep(0.1)  # nothing reads: it stays there
        assert not writer.done()
        writer.cancel()
        spool.close()
        return written

    written = asyncio.run(go())
    # Memory, then file, each at most one piece over its bound.
    assert BOUND <= written <= BOUND + 2 * 4096


@pytest.mark.parametrize(("url", "here"), [
    (None, True), ("postgresql://u@/db?host=/tmp/pg", True), ("postgresql://u@localhost/db", True),
    ("postgresql://u@127.0.0.1:5433/db", True), ("postgresql://u@[::1]/db", True),
    ("postgresql://u@db.internal/db", False), ("postgresql://u@10.0.0.5/db", False)])
def test_ranges_leave_the_cores_to_a_database_on_this_host(
        url: str | None, here: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On 2 cores two ranges made an export slower than one COPY when PostgreSQL ran on the
    same machine: by default, half this machine's cores then; a set value is kept."""
    assert on_this_host(url) is here
    monkeypatch.delenv("EXPORTER_EXPORT_PARALLEL", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _cores_to_spare(Settings(database_url=url)) == (1 if here else 4)
    assert _cores_to_spare(Settings(database_url=url, export_parallel=4)) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert _cores_to_spare(Settings(database_url=url)) == (8 if here else 4)
