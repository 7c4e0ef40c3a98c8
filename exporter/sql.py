"""Building the SQL of an export: the one place where text becomes SQL.

COPY cannot take bind parameters, so the SELECT inside it carries its values as
literals. Every value is first checked by PostgreSQL through bound parameters
(`pg_input_is_valid`), then written as a quoted literal cast to the column's type;
identifiers come from the catalog and are always quoted. The connection runs with
`standard_conforming_strings = on` (see db.py), so doubling the single quote is the
whole of literal quoting.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from exporter.errors import bad_parameter
from exporter.query import COMPARISONS, PATTERNS, ExportQuery, Filter


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    if "\x00" in value:
        raise ValueError("PostgreSQL text cannot hold NUL bytes")
    return "'" + value.replace("'", "''") + "'"


def _typed(value: str, pg_type: str) -> str:
    # pg_type comes from format_type() in the catalog, never from the request.
    return f"{quote_literal(value)}::{pg_type}"


def _condition(f: Filter) -> str:
    col = quote_ident(f.column.name)
    if f.operator == "is":
        condition = f"{col} IS {f.is_value}"
    elif f.operator == "in":
        if not f.values:
            condition = "false"
        else:
            items = ", ".join(_typed(v, f.column.base_type) for v in f.values)
            condition = f"{col} IN ({items})"
    elif f.operator in PATTERNS:
        target = col if f.column.category == "S" else f"{col}::text"
        condition = f"{target} {PATTERNS[f.operator]} {quote_literal(f.values[0])}"
    else:
        condition = f"{col} {COMPARISONS[f.operator]} {_typed(f.values[0], f.column.base_type)}"
    return f"NOT ({condition})" if f.negated else condition


def select_sql(query: ExportQuery) -> str:
    ds = query.dataset
    parts = [
        "SELECT " + ", ".join(quote_ident(c.name) for c in query.columns),
        f"FROM {quote_ident(ds.schema)}.{quote_ident(ds.name)}",
    ]
    if query.filters:
        parts.append("WHERE " + " AND ".join(_condition(f) for f in query.filters))
    if query.order:
        terms = []
        for o in query.order:
            term = quote_ident(o.column.name) + (" DESC" if o.descending else " ASC")
            if o.nulls:
                term += f" NULLS {o.nulls}"
            terms.append(term)
        parts.append("ORDER BY " + ", ".join(terms))
    if query.limit is not None:
        parts.append(f"LIMIT {int(query.limit)}")
    if query.offset is not None:
        parts.append(f"OFFSET {int(query.offset)}")
    return " ".join(parts)


async def check_values(conn: AsyncConnection, query: ExportQuery) -> None:
    """Ask PostgreSQL whether each filter value is valid input for its column's type.

    One round trip; values travel as bound parameters. Raises a 400 naming the
    parameter of the first bad value.
    """
    checks: list[tuple[Filter, str]] = [
        (f, v) for f in query.filters if f.operator not in ("is", *PATTERNS) for v in f.values
    ]
    if not checks:
        return
    columns = []
    params: dict[str, Any] = {}
    for i, (f, value) in enumerate(checks):
        columns.append(f"(pg_input_error_info(:v{i}, :t{i})).message AS e{i}")
        params[f"v{i}"] = value
        params[f"t{i}"] = f.column.base_type
    row = (await conn.execute(text("SELECT " + ", ".join(columns)), params)).one()
    for i, (f, value) in enumerate(checks):
        if row[i] is not None:
            raise bad_parameter(
                f.parameter,
                f"{value!r} is not a valid {f.column.type} for column '{f.column.name}': {row[i]}",
            )
