"""Re-measure only the whole-table CSV and NDJSON exports against psql, on the full run's
data, and print the markdown table: a second opinion when the full run's ratios may
have been bent by a busy machine (a full run takes 20 minutes; this takes about 5).

Usage: .venv/bin/python -m bench.recheck [rounds]
"""

from __future__ import annotations

import sys

from bench import exports
from bench.database import database
from bench.harness import Plan, interleaved, machine, results_table


def main(argv: list[str]) -> None:
    rounds = int(argv[0]) if argv else 3
    plan = Plan.make(quick=False)
    print(f"machine: {machine()}", flush=True)
    with database(plan) as url:
        qs = exports.queries(plan)
        csv = exports.psql_bytes(url, qs["csv"].copy)
        ndjson = exports.psql_bytes(url, qs["ndjson"].copy)
        with exports.exporter_service(plan, url, "recheck") as server:
            server.start("/healthz")
            contenders = [
                exports.psql_contender("psql CSV", url, qs["csv"], csv),
                exports.curl_contender("exporter CSV", server, qs["csv"].path, csv),
                exports.psql_contender("psql NDJSON (row_to_json)", url, qs["ndjson"], ndjson),
                exports.curl_contender("exporter NDJSON", server, qs["ndjson"].path, ndjson),
            ]
            results = interleaved(contenders, rounds)
    refs = {"exporter NDJSON": results[2]}
    print("\n".join(results_table(results, results[0], refs)))


if __name__ == "__main__":
    main(sys.argv[1:])
