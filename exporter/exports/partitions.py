"""A partitioned table's export as PostgreSQL reads it: its leaf partitions in the order of
the plan's Append, each a heap that ctid ranges can split (exports/parallel.py).

One COPY of a partitioned table is an Append of one scan per partition left after pruning,
in the partition descriptor's bound order (the default partition where the planner puts
it, sub-partitions flattened in place), each scan in its heap's block order. So the
partitions read one after the other with `FROM ONLY`, the filters in each, give the bytes
of that COPY, as long as the plan is that and nothing else: the plan is read (`EXPLAIN`,
no rows read) and anything but an Append of sequential or bitmap heap scans (an index
scan, a MergeAppend, a Gather whose order is the workers', a foreign partition) keeps
one COPY.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from exporter.exports import sql
from exporter.exports.query import ExportQuery

# A partition: (schema, name).
Partition = tuple[str, str]

# Scans that read a heap in block order, as a ctid range of it does.
_HEAP_SCANS = {"Seq Scan", "Bitmap Heap Scan"}


async def leaves(conn: AsyncConnection, query: ExportQuery) -> list[Partition] | None:
    """The partitions one COPY of the export reads, in its order, or None if its plan
    is not an Append of heap scans in the partitions' bound order."""
    read = await _plan_leaves(conn, sql.select_sql(query))
    if read is None or not read or not await _readable_alone(conn, query, read):
        return None
    if query.filters or query.trees or query.changed_since is not None:
        # Pruning leaves some partitions out; what is left keeps the whole table's order
        # (the table read with no condition), or the export is one COPY.
        ds = query.dataset
        every = await _plan_leaves(
            conn, f"SELECT NULL FROM {sql.qualified(ds.schema, ds.name)}")
        if every is None or not _in_order(read, every):
            return None
    return read


async def _readable_alone(conn: AsyncConnection, query: ExportQuery,
                          read: list[Partition]) -> bool:
    """Whether the partitions read alone give what the table gives: PostgreSQL checks the
    privileges and applies the row security policies of the table named in the query
    only (the parent's through the parent, a partition's through the partition), so a
    partition this role may not read by itself, or row security on the table or on any
    of them, keeps one COPY."""
    ds = query.dataset
    names = [sql.qualified(*p) for p in [(ds.schema, ds.name), *read]]
    row = (await conn.exec_driver_sql(
        "SELECT bool_and(has_table_privilege(c.oid, 'SELECT') AND NOT c.relrowsecurity)"
        " FROM unnest(CAST($1 AS text[])) AS r JOIN pg_class c"
        " ON c.oid = CAST(r AS regclass)", (names,))).scalar_one()
    return bool(row)


def _in_order(part: list[Partition], whole: list[Partition]) -> bool:
    """Whether `part` is `whole` with some partitions left out, the rest in order."""
    rest = iter(whole)
    return len(set(part)) == len(part) and all(p in rest for p in part)


async def _plan_leaves(conn: AsyncConnection, select: str) -> list[Partition] | None:
    plan = (await conn.exec_driver_sql(
        f"EXPLAIN (FORMAT JSON, VERBOSE, COSTS OFF) {select}")).scalar_one()
    nodes = json.loads(plan) if isinstance(plan, str) else plan
    found: list[Partition] = []
    return found if _walk(nodes[0]["Plan"], found) else None


def _walk(node: dict[str, Any], found: list[Partition]) -> bool:
    """Adds the heap scans under `node` in the order they run; False if anything there
    reads in another order (or in parallel)."""
    kind = node.get("Node Type")
    if node.get("Parallel Aware"):
        return False
    if kind in _HEAP_SCANS:
        # A bitmap heap scan's children are its index's bitmap: no rows, no order.
        found.append((str(node["Schema"]), str(node["Relation Name"])))
        return True
    if kind == "Append":
        return all(_walk(child, found) for child in node.get("Plans", []))
    return False
