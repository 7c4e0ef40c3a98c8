"""What the JSON array costs against NDJSON, and how its framing is best made.

    .venv/bin/python -m bench.json [--quick] [--rows N] [--rounds N]

The demo table (`exports.orders`, N rows; default 1,000,000, `--quick` 100,000) in the
benchmark's embedded PostgreSQL (var/bench-json/, kept between runs), one `exporter
serve` on it. In interleaved rounds: psql `\\copy` of NDJSON's COPY (the reference), of
the JSON renderer's (the same with `translate` keeping a `json` value on one line), and
of the other way to frame an array in SQL (a `row_number()` window choosing `[` or `,`
before each row); then real `curl` runs of `.ndjson` and `.json` through the server, where
the JSON renderer frames the rows in Python. Prints markdown with server peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bench.database import database
from bench.exports import Query, curl_contender, exporter_service, psql_bytes, psql_contender
from bench.harness import MB, ROOT, Plan, fmt_bytes, fmt_seconds, interleaved, machine

SELECT = "SELECT * FROM exports.orders ORDER BY id"
# NDJSON's: the quote and delimiter bytes never occur in JSON text (exports/renderers/).
OPTIONS = "WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
NDJSON = f"\\copy (SELECT row_to_json(s) FROM ({SELECT}) AS s) TO STDOUT {OPTIONS}"
TRANSLATED = (f"\\copy (SELECT translate(row_to_json(s)::text, E'\\n\\r', '  ')"
              f" FROM ({SELECT}) AS s) TO STDOUT {OPTIONS}")
WINDOW = (f"\\copy (SELECT CASE WHEN row_number() OVER () = 1 THEN '[' ELSE ',' END"
          f" || row_to_json(s)::text FROM ({SELECT}) AS s) TO STDOUT {OPTIONS}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.json", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    work = ROOT / "var" / ("bench-json-quick" if args.quick else "bench-json")
    plan = dataclasses.replace(
        Plan.make(args.quick, out=work, work=work),
        demo_rows=args.rows or (100_000 if args.quick else 1_000_000),
        generated_rows=1000, repetitions=args.rounds or (2 if args.quick else 5))
    with database(plan, log) as url, exporter_service(plan, url, "json") as server:
        server.start("/healthz")
        sizes = {name: psql_bytes(url, copy) for name, copy in
                 (("ndjson", NDJSON), ("translated", TRANSLATED), ("window", WINDOW))}
        contenders = [
            psql_contender("psql NDJSON (row_to_json)", url,
                           Query("ndjson", NDJSON, ""), sizes["ndjson"]),
            psql_contender("psql, the JSON renderer's COPY (translate)", url,
                           Query("translated", TRANSLATED, ""), sizes["translated"]),
            psql_contender("psql, framed by a row_number() window", url,
                           Query("window", WINDOW, ""), sizes["window"]),
            curl_contender("exporter .ndjson", server, "/datasets/orders.ndjson?order=id",
                           sizes["ndjson"]),
            # The array adds `[`, `]` and 2 bytes of separator a row (json_agg's `, \n `
            # in place of `\n`).
            curl_contender("exporter .json (framed in Python)", server,
                           "/datasets/orders.json?order=id",
                           sizes["ndjson"] + 2 * plan.demo_rows + 1),
        ]
        log(f"{plan.repetitions} interleaved rounds")
        results = interleaved(contenders, plan.repetitions, log)
    reference = results[0]
    lines = [
        f"### JSON arrays against NDJSON ({plan.demo_rows:,} rows, "
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
    ndjson, as_json = results[3], results[4]
    ratio = as_json.median_seconds / ndjson.median_seconds
    lines += ["", f"Over HTTP the JSON array takes {ratio:.2f}× as long as NDJSON."]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
