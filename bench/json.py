"""What the JSON array costs against NDJSON, and how its framing is best made.

    .venv/bin/python -m bench.json [--quick] [--rows N] [--rounds N]

Rows made on the fly (a view over generate_series, N rows, default 1,000,000, `--quick`
100,000, about the width of the demo table with text that JSON escapes): a loaded table
would take minutes and the disk other work shares, and COPY cannot tell the difference.
The benchmark's embedded PostgreSQL lives in var/bench-json/, one `exporter serve` on it.
In interleaved rounds: psql `\\copy` of NDJSON's COPY (the reference, which the JSON
renderer runs too), and of the other way to frame an array in SQL (a `row_number()`
window choosing `[` or `,` before each row); then real `curl` runs of `.ndjson` and
`.json` through the server, where the JSON renderer frames the rows in Python. The
server keeps no copies of its exports (EXPORTER_EXPORTS_RESUME=false): 220 MB a run
would fill the disk, and both formats would pay the same. Prints markdown with server
peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import time

from bench.database import database, execute, psql_command, psql_env
from bench.exports import Query, curl_contender, exporter_service, psql_bytes, psql_contender
from bench.harness import MB, ROOT, Plan, fmt_bytes, fmt_seconds, interleaved, machine
from exporter.exports.renderers.json import JSON

VIEW = "json_bench"
SELECT = f"SELECT * FROM exports.{VIEW}"
# NDJSON's: the quote and delimiter bytes never occur in JSON text (exports/renderers/).
OPTIONS = "WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
NDJSON = f"\\copy (SELECT row_to_json(s) FROM ({SELECT}) AS s) TO STDOUT {OPTIONS}"
WINDOW = (f"\\copy (SELECT CASE WHEN row_number() OVER () = 1 THEN '[' ELSE ',' END"
          f" || row_to_json(s)::text FROM ({SELECT}) AS s) TO STDOUT {OPTIONS}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def framing_seconds(url: str, piece: int = 64 * 1024) -> float:
    """The JSON renderer's framing alone, on NDJSON's COPY output held in memory and fed
    in pieces of `piece` bytes: the Python cost the server adds to NDJSON."""
    raw = subprocess.run(psql_command(url, NDJSON), env=psql_env(), check=True,
                         capture_output=True).stdout

    async def frame() -> float:
        async def sink(data: bytes) -> None:
            pass

        rows = JSON.rows(sink, sink)
        started = time.perf_counter()
        await rows.begin()
        for at in range(0, len(raw), piece):
            await rows.write(raw[at:at + piece])
        await rows.end()
        return time.perf_counter() - started

    return min(asyncio.run(frame()) for _ in range(3))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.json", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    work = ROOT / "var" / ("bench-json-quick" if args.quick else "bench-json")
    plan = dataclasses.replace(
        Plan.make(args.quick, out=work, work=work),
        demo_rows=1000, generated_rows=1000, repetitions=args.rounds or (2 if args.quick else 5))
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    with database(plan, log) as url, exporter_service(plan, url, "json", {
            "EXPORTER_EXPORTS_RESUME": "false"}) as server:
        # generate_series in the select list streams (in FROM it is materialised first).
        execute(url, f"""
            CREATE OR REPLACE VIEW exports.{VIEW} AS
            SELECT g AS id, 'customer "' || (g % 1000) || '"' AS customer,
                   round((g % 100000)::numeric / 100, 2) AS amount,
                   timestamptz '2026-01-01' + g * interval '1 second' AS created_at,
                   g % 3 = 0 AS paid, md5(g::text) AS hash,
                   E'a\\b\tc \u2028 ü ' || repeat('y', 40) AS note
            FROM (SELECT generate_series(1::bigint, {int(rows)}::bigint) AS g) AS s""")
        server.start("/healthz")
        sizes = {name: psql_bytes(url, copy) for name, copy in
                 (("ndjson", NDJSON), ("window", WINDOW))}
        contenders = [
            psql_contender("psql NDJSON (row_to_json)", url,
                           Query("ndjson", NDJSON, ""), sizes["ndjson"]),
            psql_contender("psql, framed by a row_number() window", url,
                           Query("window", WINDOW, ""), sizes["window"]),
            curl_contender("exporter .ndjson", server, f"/datasets/{VIEW}.ndjson",
                           sizes["ndjson"]),
            # json_agg's separator `, \n ` in place of each `\n` but the last, which goes;
            # and `[`, `]`.
            curl_contender("exporter .json (framed in Python)", server,
                           f"/datasets/{VIEW}.json", sizes["ndjson"] + 3 * rows - 2),
        ]
        log(f"{plan.repetitions} interleaved rounds")
        results = interleaved(contenders, plan.repetitions, log)
        framing = framing_seconds(url)
    reference = results[0]
    lines = [
        f"### JSON arrays against NDJSON ({rows:,} rows, "
        f"{sizes['ndjson'] / MB:,.0f} MB of NDJSON)", "",
        f"`.venv/bin/python -m bench.json{' --quick' if args.quick else ''}` "
        f"({machine()}), {plan.repetitions} interleaved rounds.", "",
        "| contender | median time | throughput | vs psql NDJSON | server peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.contender.name} | {fmt_seconds(r.median_seconds)} | "
                     f"{r.throughput():,.0f} MB/s | "
                     f"**{reference.median_seconds / r.median_seconds:.2f}×** | "
                     f"{fmt_bytes(r.peak_rss) if r.peak_rss else '—'} |")
    ndjson, as_json = results[2], results[3]
    ratio = as_json.median_seconds / ndjson.median_seconds
    lines += ["", f"Over HTTP the JSON array takes {ratio:.2f}× as long as NDJSON. The "
              f"framing alone (in 64 KiB pieces, best of 3) took {fmt_seconds(framing)}."]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
