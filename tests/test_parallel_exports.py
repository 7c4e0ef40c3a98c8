"""Exports read as ctid ranges by several backends in one snapshot (issue 25,
exporter/exports/parallel.py): the bytes of one COPY, the snapshot held against writers,
every backend gone when the client leaves or a range fails."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
import zstandard

from tests.support import (
    Server,
    asyncpg_dsn,
    audited,
    fetch,
    last_audit_id,
    psql,
    run_async,
    run_sql,
    wait_until,
)

pytestmark = pytest.mark.xdist_group("parallel-exports")

RANGES = 3
ROWS = 6000
# The wide table's rows compress in the heap (a few pages) but not in the export (48 MB,
# asked for uncompressed): more than socket buffers (TCP to PostgreSQL 15) and spools
# hold, so a paused download keeps every range's backend at work.
WIDE_ROWS = 12000
IDENTITY = {"Accept-Encoding": "identity"}
RANGES_LOGGED = "ctid ranges"
PARTS_ROWS = 6000


@pytest.fixture(scope="module")
def tables(database_url: str) -> str:
    run_sql(
        database_url,
        "DROP MATERIALIZED VIEW IF EXISTS exports.par_mat",
        "DROP TABLE IF EXISTS exports.par_rows, exports.par_wide, exports.par_bank,"
        " exports.par_parts",
        # Line breaks in text (CSV quotes them) and in json (NDJSON's quoted rows, the
        # JSON array's framing) on every side of the ranges' bounds.
        "CREATE TABLE exports.par_rows (id int PRIMARY KEY, note text, j json,"
        " at timestamptz, n numeric, flag boolean)",
        "INSERT INTO exports.par_rows SELECT g,"
        " CASE WHEN g % 11 = 0 THEN E'line\\nbreak \"q\", \\\\ tab\\t' ELSE 'n' || g END,"
        " CASE WHEN g % 7 = 0 THEN E'{\"a\":\\n [1, 2]}'::json"
        "  ELSE json_build_object('g', g) END,"
        " timestamptz '2026-01-01' + g * interval '1 minute', g / 7.0, g % 3 = 0"
        f" FROM generate_series(1, {ROWS}) AS g",
        "CREATE TABLE exports.par_wide (id int, pad text)",
        "INSERT INTO exports.par_wide SELECT g, repeat(md5(g::text), 125)"
        f" FROM generate_series(1, {WIDE_ROWS}) AS g",
        "CREATE TABLE exports.par_bank (id int PRIMARY KEY, balance int, pad text)",
        "INSERT INTO exports.par_bank SELECT g, 100, repeat('x', 150)"
        f" FROM generate_series(1, {ROWS}) AS g",
        "CREATE MATERIALIZED VIEW exports.par_mat AS SELECT * FROM exports.par_rows",
        # Range partitions created out of their bounds' order (and not in the order of
        # their OIDs): a, then the default, then b (by list of `kind`, with a default of
        # its own), then c, which holds most rows (split in ranges of its own).
        "CREATE TABLE exports.par_parts (id int, k int, kind text, note text, j json)"
        " PARTITION BY RANGE (k)",
        "CREATE TABLE exports.par_parts_c PARTITION OF exports.par_parts"
        " FOR VALUES FROM (2000) TO (3000)",
        "CREATE TABLE exports.par_parts_d PARTITION OF exports.par_parts DEFAULT",
        "CREATE TABLE exports.par_parts_a PARTITION OF exports.par_parts"
        " FOR VALUES FROM (0) TO (1000)",
        "CREATE TABLE exports.par_parts_b PARTITION OF exports.par_parts"
        " FOR VALUES FROM (1000) TO (2000) PARTITION BY LIST (kind)",
        "CREATE TABLE exports.par_parts_b_yz PARTITION OF exports.par_parts_b"
        " FOR VALUES IN ('y', 'z')",
        "CREATE TABLE exports.par_parts_b_other PARTITION OF exports.par_parts_b DEFAULT",
        "CREATE TABLE exports.par_parts_b_x PARTITION OF exports.par_parts_b"
        " FOR VALUES IN ('x')",
        "CREATE INDEX ON exports.par_parts (id)",
        # Rows inserted in no order of id or k: each partition's heap holds them as they
        # came, which is the order one COPY reads them in.
        "INSERT INTO exports.par_parts SELECT g, CASE WHEN g <= 600 THEN g"
        " WHEN g <= 1500 THEN 1000 + g % 1000 WHEN g <= 5000 THEN 2000 + g % 1000"
        " ELSE 3000 + g END, (ARRAY['x', 'y', 'z', 'w'])[1 + g % 4],"
        " CASE WHEN g % 11 = 0 THEN E'line\\nbreak \"q\"' ELSE 'n' || g END,"
        " CASE WHEN g % 7 = 0 THEN E'{\"a\":\\n [1, 2]}'::json"
        "  ELSE json_build_object('g', g) END"
        f" FROM generate_series(1, {PARTS_ROWS}) AS g ORDER BY (g * 7919) % {PARTS_ROWS + 7}",
        "VACUUM ANALYZE exports.par_rows, exports.par_wide, exports.par_bank, exports.par_mat,"
        " exports.par_parts",
    )
    return database_url


@pytest.fixture(scope="module")
def parallel_server(tables: str, make_module_server: type[Server]) -> Iterator[Server]:
    with make_module_server({
        "EXPORTER_EXPORT_PARALLEL": str(RANGES),
        "EXPORTER_EXPORT_PARALLEL_MIN_PAGES": "1",
        # 32 KiB of memory and 256 KiB of file for each range ahead: every range of
        # par_rows (about 350 KB each) goes through its spool's file, and fills it.
        "EXPORTER_EXPORT_CHUNK_SIZE": "16384",
        "EXPORTER_EXPORT_BUFFER_CHUNKS": "2",
        "EXPORTER_EXPORT_PARALLEL_SPOOL": str(512 * 1024),
        # A client that leaves cancels the export at once (no copy completed).
        "EXPORTER_EXPORTS_RESUME": "false",
    }) as server:
        yield server


@pytest.fixture(scope="module")
def single_server(tables: str, make_module_server: type[Server]) -> Iterator[Server]:
    with make_module_server({"EXPORTER_EXPORT_PARALLEL": "1"}) as server:
        yield server


def _ranges_logged(server: Server) -> int:
    return server.log().count(RANGES_LOGGED)


def _get(server: Server, path: str) -> httpx.Response:
    response = httpx.get(server.url + path, timeout=60)
    assert response.status_code == 200, response.text
    return response


def _decoded(path: str, body: bytes) -> bytes:
    if ".gz" in path:
        return gzip.decompress(body)
    if ".zst" in path:
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return body


@pytest.mark.parametrize("path", [
    "/datasets/par_rows.csv",
    "/datasets/par_rows.ndjson",
    "/datasets/par_rows.json",
    "/datasets/par_rows.tsv",
    "/datasets/par_rows.csv.gz",
    "/datasets/par_rows.ndjson.zst",
    "/datasets/par_rows.csv?flag=is.true&select=id,j,note",
    "/datasets/par_mat.json",
])
def test_ranges_give_the_bytes_of_one_copy(parallel_server: Server, path: str) -> None:
    before = _ranges_logged(parallel_server)
    parallel = _get(parallel_server, path)
    assert _ranges_logged(parallel_server) == before + 1
    # `limit` keeps one COPY, of the same rows in the same order.
    single = _get(parallel_server, path + ("&" if "?" in path else "?") + "limit=1000000")
    assert _ranges_logged(parallel_server) == before + 1
    assert _decoded(path, parallel.content) == _decoded(path, single.content)
    assert len(_decoded(path, parallel.content)) > 50_000
    assert parallel.headers.get("export-cursor")


def test_a_whole_table_csv_is_psqls_copy(parallel_server: Server, tables: str) -> None:
    body = _get(parallel_server, "/datasets/par_rows.csv").content
    assert body == psql(tables, "-c", "\\copy (SELECT * FROM exports.par_rows) TO STDOUT"
                        " WITH (FORMAT csv, HEADER)")


def test_ordered_limited_and_indexed_exports_stay_one_copy(parallel_server: Server) -> None:
    before = _ranges_logged(parallel_server)
    # An order, a part of the rows, a HEAD, a page of items, and a filter PostgreSQL reads
    # through an index (its order is the index's).
    for path in ("/datasets/par_rows.csv?order=id.desc", "/datasets/par_rows.csv?offset=5",
                 "/datasets/par_rows.csv?id=lt.20"):
        _get(parallel_server, path)
    assert httpx.head(parallel_server.url + "/datasets/par_rows.csv").status_code == 200
    paged = httpx.get(parallel_server.url + "/datasets/par_rows",
                      headers={"Range-Unit": "items", "Range": "0-9"})
    assert paged.status_code in (200, 206) and len(paged.json()) == 10
    assert _ranges_logged(parallel_server) == before


def test_a_stored_export_reads_in_ranges_too(parallel_server: Server) -> None:
    before = _ranges_logged(parallel_server)
    started = httpx.get(parallel_server.url + "/datasets/par_rows.ndjson",
                        headers={"Prefer": "respond-async"}, timeout=30)
    assert started.status_code == 202, started.text

    def done() -> bool:
        return httpx.get(parallel_server.url + started.headers["location"],
                         timeout=30).status_code != 202

    assert wait_until(done, 30)
    manifest = httpx.get(parallel_server.url + started.headers["location"], timeout=30).json()
    assert manifest["status"] == "complete", manifest
    stored = httpx.get(manifest["file_url"], timeout=30).content
    assert _ranges_logged(parallel_server) == before + 1
    assert stored == _get(parallel_server, "/datasets/par_rows.ndjson?limit=1000000").content


def test_under_load_fewer_ranges_then_one_copy(parallel_server: Server, tables: str) -> None:
    """The extra backends take export slots only while half the cap (20: 10) stays free:
    with 8 exports running elsewhere this one gets 1 extra, with 9 none."""
    run_sql(tables, "INSERT INTO exporter.instances (id, host, pid, expires_at)"
            " VALUES ('par-load', 'elsewhere', 0, now() + interval '1 hour')")
    try:
        whole = None
        for held, ranges in ((8, 2), (9, 0)):
            run_sql(tables, "DELETE FROM exporter.slots WHERE instance = 'par-load'",
                    "INSERT INTO exporter.slots (key, instance) SELECT 'exports', 'par-load'"
                    f" FROM generate_series(1, {held})")
            logged = len(parallel_server.log())
            body = _get(parallel_server, "/datasets/par_rows.csv").content
            new = parallel_server.log()[logged:]
            assert new.count(RANGES_LOGGED) == (1 if ranges else 0), new
            assert not ranges or f"{ranges} {RANGES_LOGGED}" in new
            assert whole is None or body == whole
            whole = body
    finally:
        run_sql(tables, "DELETE FROM exporter.instances WHERE id = 'par-load'")


def test_since_in_ranges_gives_what_one_copy_gives(parallel_server: Server,
                                                   tables: str) -> None:
    """Each range's transaction counts `since` from its own age() reference."""
    cursor = _get(parallel_server, "/datasets/par_rows.csv").headers["export-cursor"]
    run_sql(tables, "UPDATE exports.par_rows SET n = n + 1 WHERE id % 1000 IN (1, 999)")
    try:
        before = _ranges_logged(parallel_server)
        path = f"/datasets/par_rows.ndjson?since={cursor}"
        parallel = _get(parallel_server, path).content
        assert _ranges_logged(parallel_server) == before + 1
        assert parallel == _get(parallel_server, path + "&limit=1000000").content
        ids = sorted(int(line.split(b",")[0].split(b":")[1]) for line in parallel.splitlines())
        assert ids == sorted(i for i in range(1, ROWS + 1) if i % 1000 in (1, 999))
    finally:
        run_sql(tables, "UPDATE exports.par_rows SET n = n - 1 WHERE id % 1000 IN (1, 999)")


def test_the_snapshot_holds_against_writers(parallel_server: Server, tables: str) -> None:
    """Transfers between the first and the last rows commit all along the export: each
    range must see the balances of the export's one snapshot (each row once, the total
    unchanged), whichever block a row's new version went to."""
    stop = threading.Event()
    transfers = [0]

    async def write() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(tables))
        try:
            while not stop.is_set():
                await conn.execute(
                    "UPDATE exports.par_bank SET balance = balance"
                    " + CASE WHEN id = $1 THEN -1 ELSE 1 END WHERE id IN ($1, $2)",
                    1 + transfers[0] % 50, ROWS - transfers[0] % 50)
                transfers[0] += 1
        finally:
            await conn.close()

    writer = threading.Thread(target=run_async, args=(write,))
    writer.start()
    try:
        assert wait_until(lambda: transfers[0] > 20, 10)
        for _ in range(3):
            before = _ranges_logged(parallel_server)
            lines = _get(parallel_server, "/datasets/par_bank.csv?select=id,balance"
                         ).content.splitlines()[1:]
            assert _ranges_logged(parallel_server) == before + 1
            rows = [tuple(map(int, line.split(b","))) for line in lines]
            assert sorted(i for i, _ in rows) == list(range(1, ROWS + 1))
            assert sum(b for _, b in rows) == 100 * ROWS
    finally:
        stop.set()
        writer.join()
    assert transfers[0] > 20


def _copies_running(url: str) -> list[str]:
    return [r["query"] for r in fetch(
        url, "SELECT query FROM pg_stat_activity WHERE application_name = 'exporter'"
        " AND state = 'active' AND query LIKE 'COPY%'")]


def _wide_backends(url: str) -> list[int]:
    return [r["pid"] for r in fetch(
        url, "SELECT pid FROM pg_stat_activity WHERE application_name = 'exporter'"
        " AND state = 'active' AND query LIKE 'COPY%par_wide%'")]


def test_a_client_that_leaves_cancels_every_range(parallel_server: Server,
                                                  tables: str) -> None:
    logged = len(parallel_server.log())
    with httpx.Client(timeout=30) as client, client.stream(
            "GET", parallel_server.url + "/datasets/par_wide.csv", headers=IDENTITY
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()  # held: its end closes the response
        next(chunks)
        # Every range at work: the first one waits on the client, the others on their
        # spools.
        assert wait_until(lambda: len(_wide_backends(tables)) == RANGES, 10)
    assert wait_until(lambda: not _wide_backends(tables), 5), _wide_backends(tables)
    # Clients that leave at once, each after more of the export (some of these exports
    # are one COPY, their slots taken by the last ones' ranges, not yet given back).
    for leaving in range(12):
        with httpx.Client(timeout=30) as client, client.stream(
                "GET", parallel_server.url + "/datasets/par_wide.csv", headers=IDENTITY
        ) as response:
            chunks = response.iter_raw()
            for _ in range(1 + 3 * leaving):
                next(chunks)
    assert wait_until(lambda: not _wide_backends(tables), 5), _wide_backends(tables)
    # An ordinary client leaving is no error. asyncpg's COPY, its task cancelled while
    # it awaited data, sent no cancel request and failed on the rest of the output:
    # "Fatal error on transport ... 'NoneType' object has no attribute 'cancelled'"
    # (asyncio, at ERROR), in about one of these runs in two.
    new = parallel_server.log()[logged:]
    assert "Fatal error" not in new and "Traceback" not in new, new
    assert " ERROR " not in new, new


def test_a_range_that_fails_breaks_the_download(parallel_server: Server,
                                                tables: str) -> None:
    before = last_audit_id(tables)
    # A filter of its own (on an unindexed column: still ranges) tells its audit rows from
    # the previous test's, whose batch may come after `before`. Tried again if it was read
    # as one COPY: right after the last test's export was cut (in a full run) one was.
    for _ in range(3):
        with httpx.Client(timeout=30) as client, client.stream(
                "GET", parallel_server.url + "/datasets/par_wide.csv?pad=not.is.null",
                headers=IDENTITY
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            received = len(next(chunks))
            if not wait_until(lambda: len(_wide_backends(tables)) == RANGES, 10):
                continue
            # The last range's backend dies mid-way.
            last = fetch(tables, "SELECT pid FROM pg_stat_activity WHERE application_name ="
                         " 'exporter' AND query LIKE 'COPY%par_wide%ctid >=%'"
                         " AND query NOT LIKE '%ctid <%'")
            assert len(last) == 1
            run_sql(tables, f"SELECT pg_terminate_backend({last[0]['pid']})")
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in chunks:
                    received += len(chunk)
            break
    else:
        pytest.fail("three exports of par_wide were read as one COPY")
    assert received < WIDE_ROWS * 4000  # cut, not the whole export
    assert wait_until(lambda: not _wide_backends(tables), 5), _wide_backends(tables)
    rows = audited(tables, "id > $1 AND target = 'par_wide' AND params::text LIKE '%pad%'",
                   before)
    assert rows[-1]["status"] == "failed"



# Its 6 leaf partitions in 7 pieces: par_parts_c, over half the rows, in two.
@pytest.mark.parametrize("path, partitions, pieces", [
    ("/datasets/par_parts.csv", 6, 7),
    ("/datasets/par_parts.ndjson", 6, 7),
    ("/datasets/par_parts.json", 6, 7),
    # Pruned: the range partition a, and b's list partitions but x.
    ("/datasets/par_parts.csv?k=gte.1000&kind=eq.x&select=id,j,note", 3, 4),
    # Read through the index on id in every partition: one COPY.
    ("/datasets/par_parts.csv?id=eq.4", 0, 0),
])
def test_a_partitioned_table_is_read_per_partition(parallel_server: Server,
                                                   single_server: Server, tables: str,
                                                   path: str, partitions: int,
                                                   pieces: int) -> None:
    """Its partitions in the order of one COPY's Append (range bounds, the default last,
    the sub-partitions in place), the largest in ranges of its own: the bytes of one
    COPY, filters and pruning included."""
    # An earlier test's export still read on into its copy (its client left) holds export
    # slots: the extra backends are then refused and the export is one COPY, as it should.
    assert wait_until(lambda: not _copies_running(tables), 20), _copies_running(tables)
    logged = len(parallel_server.log())
    parallel = _get(parallel_server, path).content
    new = parallel_server.log()[logged:]
    if partitions:
        assert new.count(RANGES_LOGGED) == 1, new
        assert f"{pieces} ctid ranges of {partitions} partitions" in new, new
    else:
        assert RANGES_LOGGED not in new
    logged = len(single_server.log())
    assert parallel == _get(single_server, path).content
    assert RANGES_LOGGED not in single_server.log()[logged:]
    assert len(parallel) > (1000 if partitions else 10)


def test_a_partitioned_tables_csv_is_psqls_copy(parallel_server: Server, tables: str) -> None:
    before = _ranges_logged(parallel_server)
    body = _get(parallel_server, "/datasets/par_parts.csv").content
    assert _ranges_logged(parallel_server) == before + 1
    assert body == psql(tables, "-c", "\\copy (SELECT * FROM exports.par_parts) TO STDOUT"
                        " WITH (FORMAT csv, HEADER)")
    assert body.count(b"\n") > PARTS_ROWS




def test_row_security_on_a_partition_keeps_one_copy(parallel_server: Server,
                                                    tables: str) -> None:
    """Read alone, a partition gets its own row security policies, not the table's
    (nor, through the table, would it get its own): such a table stays one COPY."""
    run_sql(tables, "ALTER TABLE exports.par_parts_b_x ENABLE ROW LEVEL SECURITY")
    try:
        before = _ranges_logged(parallel_server)
        body = _get(parallel_server, "/datasets/par_parts.csv").content
        assert _ranges_logged(parallel_server) == before
        assert body.count(b"\n") > PARTS_ROWS
    finally:
        run_sql(tables, "ALTER TABLE exports.par_parts_b_x DISABLE ROW LEVEL SECURITY")
