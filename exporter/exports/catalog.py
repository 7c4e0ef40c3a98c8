"""Datasets: every table and view of one PostgreSQL schema, as found in pg_catalog."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.errors import unavailable

# Relation kinds whose rows lie in one heap of their own, addressed by ctid.
HEAPS = ("r", "m")
KINDS = {"r": "table", "p": "table", "v": "view", "m": "materialized view", "f": "foreign table"}

# `base_type` is the type SQL itself gives a quoted literal compared with the column
# (`WHERE col = '...'`): a domain's base type (domains over domains followed to the
# end), with no modifier. format_type(oid, -1), unlike format_type(oid, NULL), spells
# that so it parses back unmodified: `bpchar` and `"bit"`, where `character` and `bit`
# would mean character(1) and bit(1).
_CATALOG_SQL = text(
    """
    WITH RECURSIVE domains(oid, base) AS (
        SELECT oid, typbasetype FROM pg_type WHERE typtype = 'd'
        UNION ALL
        SELECT d.oid, t.typbasetype
        FROM domains d JOIN pg_type t ON t.oid = d.base AND t.typtype = 'd'
    )
    SELECT c.relname, c.relkind::text AS relkind, c.reltuples::bigint AS reltuples,
           CASE WHEN c.relkind = 'p' THEN
               (SELECT sum(greatest(l.relpages, 0))::bigint
                FROM pg_partition_tree(c.oid) AS p JOIN pg_class l ON l.oid = p.relid
                WHERE p.isleaf AND l.relkind = 'r')
           ELSE c.relpages END AS relpages,
           a.attname, format_type(a.atttypid, a.atttypmod) AS type,
           format_type(coalesce(
               (SELECT d.base FROM domains d JOIN pg_type bt ON bt.oid = d.base
                WHERE d.oid = a.atttypid AND bt.typtype <> 'd'),
               a.atttypid), -1) AS base_type,
           t.typcategory::text AS typcategory, NOT a.attnotnull AS nullable,
           (SELECT array_position(k.conkey, a.attnum) FROM pg_constraint k
            WHERE k.conrelid = c.oid AND k.contype = 'p') AS pk_position
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_type t ON t.oid = a.atttypid
    WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
    ORDER BY c.relname, a.attnum
    """
)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as format_type() spells it, e.g. "numeric(12,2)", "text[]"
    # What filter values are checked against and cast to: the type without its modifier
    # (and a domain's base type), as SQL reads `col = '10.005'`. A modifier would change
    # the value first: numeric(12,2) rounds 10.005 to 10.01, timestamp(0) rounds seconds,
    # `interval day` drops hours, and a cast to char(3) or varchar(3) cuts 'abcd' to 'abc',
    # each making the filter match rows it should not. Nothing is lost by dropping it: a
    # value too long for char(3) matches no row, as in SQL, and arrays of a domain keep
    # the domain, whose checks SQL applies to the elements of such a literal too.
    base_type: str
    category: str  # pg_type.typcategory: S string, N numeric, B boolean, A array ...
    nullable: bool


@dataclass
class Dataset:
    schema: str
    name: str
    kind: str
    estimated_rows: int | None
    columns: dict[str, Column] = field(default_factory=dict)
    # The primary key's columns in the key's order (none for views): the page's builder
    # orders a limited download by them, so that it is the same rows every time.
    primary_key: list[str] = field(default_factory=list)
    # The pages of a table's or materialized view's heap, as last counted by VACUUM or
    # ANALYZE (a partitioned table's: the sum of its leaf partitions'; none for views and
    # foreign tables): whether an export of it is worth reading in ctid ranges
    # (exports/parallel.py).
    pages: int | None = None
    # A partitioned table: read per partition (exports/partitions.py).
    partitioned: bool = False


class Catalog:
    """The datasets of one schema; reloaded on demand, so new views need no restart."""

    def __init__(self, engine: AsyncEngine, schema: str) -> None:
        self._engine = engine
        self.schema = schema
        self._datasets: dict[str, Dataset] = {}

    async def reload(self) -> dict[str, Dataset]:
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(_CATALOG_SQL, {"schema": self.schema})).all()
        except Exception as error:
            raise unavailable(error) from error
        datasets: dict[str, Dataset] = {}
        keys: dict[str, list[tuple[int, str]]] = {}
        for row in rows:
            ds = datasets.get(row.relname)
            if ds is None:
                # reltuples is -1 until the table was first analysed, and views have none.
                estimate = int(row.reltuples) if row.reltuples >= 0 else None
                if row.relkind == "v":
                    estimate = None
                heap = row.relkind in HEAPS or row.relkind == "p"
                ds = Dataset(self.schema, row.relname, KINDS[row.relkind], estimate,
                             pages=int(row.relpages)
                             if heap and row.relpages is not None else None,
                             partitioned=row.relkind == "p")
                datasets[row.relname] = ds
            ds.columns[row.attname] = Column(
                row.attname, row.type, row.base_type, row.typcategory, row.nullable
            )
            if row.pk_position is not None:
                keys.setdefault(row.relname, []).append((row.pk_position, row.attname))
        for relname, key in keys.items():
            # In the key's order, which need not be the columns' (PRIMARY KEY (b, a)).
            datasets[relname].primary_key = [name for _, name in sorted(key)]
        self._datasets = datasets
        return datasets

    async def all(self) -> list[Dataset]:
        return sorted((await self.reload()).values(), key=lambda d: d.name)

    def get(self, name: str) -> Dataset | None:
        """A dataset by name as last loaded; call `reload` first to see new ones."""
        return self._datasets.get(name)
