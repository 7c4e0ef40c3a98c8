"""What deployment-wide download slots cost when a process takes them from the database
(its first, or a block more; a download then uses them from memory): the transaction
that takes a slot (advisory lock, count, insert) and the one that gives it back
(delete), one after the other and with many takers of one key or of different keys at
once.

    .venv/bin/python -m bench.slots [DATABASE_URL] [REPETITIONS]

Without a URL an embedded PostgreSQL is started in a temporary folder. Runs the app's
own Limiter against the database (no HTTP), with the pool of the default settings.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import sqlalchemy as sa

from bench.export_watch import database
from exporter.access.limits import Instance, Limiter, new_instance_id
from exporter.cli import migrate
from exporter.config import Settings
from exporter.db import create_engine


async def run(url: str, repetitions: int) -> None:
    settings = Settings()
    instance_id = new_instance_id()
    engine = create_engine(settings, url, instance=instance_id)
    instance = Instance(engine, instance_id, 15)
    await instance.start()
    limiter = Limiter(engine, instance_id, 4, 0, 20, 0)
    try:
        floor = []
        for _ in range(repetitions):
            started = time.perf_counter()
            async with engine.begin() as conn:
                await conn.execute(sa.text("SELECT 1"))
            floor.append(time.perf_counter() - started)
        print(f"baseline, a pooled transaction with one SELECT 1: median"
              f" {statistics.median(floor) * 1000:.2f} ms")
        takes, gives = [], []
        for _ in range(repetitions):
            started = time.perf_counter()
            slots = await limiter._insert_block("principal bench", 4, 1)
            took = time.perf_counter()
            assert slots
            await limiter._delete("principal bench", slots)
            takes.append(took - started)
            gives.append(time.perf_counter() - took)
        print(f"one after the other ({repetitions}): take median"
              f" {statistics.median(takes) * 1000:.2f} ms (p90"
              f" {statistics.quantiles(takes, n=10)[-1] * 1000:.2f}), give back median"
              f" {statistics.median(gives) * 1000:.2f} ms")

        for label, keys in (("8 takers of one key (cap 4)", ["principal one"] * 8),
                            ("8 takers of 8 keys", [f"principal k{i}" for i in range(8)])):
            refused = 0

            async def taker(key: str) -> int:
                nonlocal refused
                done = 0
                for _ in range(repetitions // 8):
                    slots = await limiter._insert_block(key, 4, 1)
                    if not slots:
                        refused += 1
                        continue
                    await limiter._delete(key, slots)
                    done += 1
                return done

            started = time.perf_counter()
            done = sum(await asyncio.gather(*(taker(k) for k in keys)))
            took = time.perf_counter() - started
            print(f"{label}: {(done + refused) / took:,.0f} takes/s"
                  f" ({done} taken and given back, {refused} refused at the cap)")
    finally:
        await instance.stop()
        await engine.dispose()


def main(url: str | None, repetitions: int) -> None:
    with database(url) as db:
        migrate(db)
        asyncio.run(run(db, repetitions))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 and "://" in sys.argv[1] else None,
         int(sys.argv[-1]) if len(sys.argv) > 1 and sys.argv[-1].isdigit() else 2000)
