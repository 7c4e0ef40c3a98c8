"""One download (and optionally 100 range clients) against several exporter servers,
interleaved: another build (a `git archive` of an older commit) or other settings.

    git archive ca010ca | tar -x -C /tmp/before
    .venv/bin/python -m bench.compare_files 1024 9 before:BASE=/tmp/before after: \\
        lowat:EXPORTER_SOCKET_NOTSENT_LOWAT=131072

Each argument after the size (MiB) and the rounds is NAME:ENV=V,ENV=V; BASE=DIR runs
the exporter found in DIR. With CONCURRENT=1 in the environment, 100 clients of 10 MiB
ranges are measured too. Uses the quick run's database (var/bench-quick/).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from contextlib import ExitStack

from bench.database import database
from bench.exports import exporter_service
from bench.files import concurrent, make_file, single, warm
from bench.harness import Contender, MiB, Plan, interleaved


def main(argv: list[str]) -> None:
    plan = Plan.make(True)
    size, rounds = int(argv[0]) * MiB, int(argv[1])
    configs = [a.split(":", 1) for a in argv[2:]]
    with database(plan, print) as url, ExitStack() as stack:
        root = plan.work / "compare"
        make_file(root / "big.bin", size)
        warm(root / "big.bin")
        singles: list[Contender] = []
        many: list[Contender] = []
        for name, envs in configs:
            env = dict(e.split("=", 1) for e in envs.split(",") if e)
            base = env.pop("BASE", None)
            svc = exporter_service(plan, url, f"compare-{name}",
                                   {"EXPORTER_FILES_ROOT": str(root), **env})
            if base:
                svc.command[1:3] = ["-c", f"import sys; sys.path.insert(0, {base!r}); "
                                    "from exporter.cli import main; main()"]
            stack.enter_context(svc)
            svc.start("/healthz")
            singles.append(single(name, svc, "/files/big.bin", size))
            many.append(concurrent(f"{name}, 100 clients", svc, dataclasses.replace(
                plan, file_size=size, range_clients=100, range_size=10 * MiB)))
        results = interleaved(singles, rounds, print)
        if os.environ.get("CONCURRENT"):
            results += interleaved(many, max(3, rounds // 2), print)
    for r in results:
        print(f"{r.contender.name:28s} {r.throughput():8.0f} MB/s  peak RSS "
              f"{r.peak_rss / MiB:.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
