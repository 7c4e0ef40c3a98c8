"""Building the SQL of an export: the one place where text becomes SQL.

COPY cannot take bind parameters, so the SELECT inside it carries its values as
literals. Every value is first checked by PostgreSQL through bound parameters
(`check_values`), then written as a quoted literal cast to the column's type;
identifiers come from the catalog and are always quoted. The connection runs with
`standard_conforming_strings = on` (see db.py), so doubling the single quote is the
whole of literal quoting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from exporter.errors import DRIVER_ERRORS, ApiError, bad_parameter, postgres_message, sqlstate
from exporter.exports.operators import BY_NAME, Operand
from exporter.exports.query import ExportQuery, Filter


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
    operator = BY_NAME[f.operator]
    column = quote_ident(f.column.name)
    if operator.operand is Operand.LIST and not f.values:
        condition = "false"  # `IN ()` is not SQL; an empty list matches no row
    else:
        if operator.operand is Operand.PATTERN and f.column.category != "S":
            column += "::text"
        condition = operator.sql.format(column=column, value=_operand(f, operator.operand))
    return f"NOT ({condition})" if f.negated else condition


def _operand(f: Filter, kind: Operand) -> str:
    if kind is Operand.KEYWORD:
        assert f.is_value is not None  # the parser's own SQL words, not the request's text
        return f.is_value
    if kind is Operand.PATTERN:
        return quote_literal(f.values[0])
    return ", ".join(_typed(v, f.column.base_type) for v in f.values)


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


def count_sql(query: ExportQuery) -> str:
    """How many rows the export's SELECT gives (exports/pages.py)."""
    return f"SELECT count(*) FROM ({select_sql(query)}) AS s"


# SQLSTATE classes of a statement that failed because of what the request asked for:
# 22 data exception (syntax, range, length of a value), 23 a domain's CHECK or NOT NULL,
# 42 an operator the column's type lacks (json has no =, point no <), 0A a type that
# takes no input (an anonymous record). Anything else is the database's trouble.
_REQUEST_ERRORS = ("22", "23", "42", "0A")
# pg_input_is_valid and pg_input_error_info are new in PostgreSQL 16.
_SOFT_CHECKS_FROM = (16,)


@dataclass(frozen=True)
class _Value:
    filter: Filter
    text: str


@dataclass(frozen=True)
class _Probe:
    """An always-true expression that fails when PostgreSQL parses it, as the export would,
    if the column's type lacks what the request asks of it: json has no =, point no <
    and no ordering. Parsed, never run against rows."""

    parameter: str
    problem: str  # "column 'p' (point) cannot be compared with 'lt'"
    sql: str


def _typed_filters(query: ExportQuery) -> list[Filter]:
    return [f for f in query.filters if BY_NAME[f.operator].cast and f.values]


def _probes(query: ExportQuery, filters: list[Filter]) -> list[_Probe]:
    probes: dict[str, _Probe] = {}
    for f in filters:
        c = f.column
        operator = BY_NAME[f.operator].compares
        expression = f"(CAST(NULL AS {c.type}) {operator} CAST(NULL AS {c.base_type})) IS NULL"
        probes.setdefault(expression, _Probe(
            f.parameter, f"column '{c.name}' ({c.type}) cannot be compared with '{f.operator}'",
            expression,
        ))
    for o in query.order:
        c = o.column
        expression = f"EXISTS (SELECT 1 FROM (SELECT CAST(NULL AS {c.type}) AS x) AS o ORDER BY x)"
        probes.setdefault(expression, _Probe(
            "order", f"column '{c.name}' ({c.type}) cannot be ordered", expression,
        ))
    return list(probes.values())


def _soft_check(values: list[_Value], probes: list[_Probe]) -> tuple[str, tuple[Any, ...]]:
    """PostgreSQL 16+: the first value that is not valid input, with the reason, if any.
    Two arrays, however many values: at most 1,664 result columns and 32,767 parameters."""
    where = [p.sql for p in probes] + ["NOT pg_input_is_valid(c.v, c.t)"]
    statement = (
        "SELECT c.ord, (pg_input_error_info(c.v, c.t)).message"
        " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS c(v, t, ord)"
        f" WHERE {' AND '.join(where)} ORDER BY c.ord LIMIT 1"
    )
    return statement, ([v.text for v in values], [v.filter.column.base_type for v in values])


def _cast_check(values: list[_Value], probes: list[_Probe]) -> tuple[str, tuple[Any, ...]]:
    """Any version: cast every value to its type at once, one array per type; fails on the
    first bad one without saying which. count() of the cast, so the planner keeps it."""
    by_type: dict[str, list[str]] = {}
    for v in values:
        by_type.setdefault(v.filter.column.base_type, []).append(v.text)
    if not by_type:
        return "SELECT " + " AND ".join(["true", *(p.sql for p in probes)]), ()
    branches = [
        f"SELECT count(CAST(v AS {pg_type})) AS n FROM unnest(${i}::text[]) AS v"
        for i, pg_type in enumerate(by_type, start=1)
    ]
    statement = f"SELECT sum(n) FROM ({' UNION ALL '.join(branches)}) AS casts"
    if probes:
        statement += " WHERE " + " AND ".join(p.sql for p in probes)
    return statement, tuple(by_type.values())


def _request_error(error: BaseException) -> bool:
    code = sqlstate(error)
    return code is not None and code.startswith(_REQUEST_ERRORS)


async def _fails(conn: AsyncConnection, statement: str, params: tuple[Any, ...]) -> str | None:
    """Why the statement failed on the request's input, or None if it ran. A failure ends
    the transaction, so that the next statement can run."""
    try:
        await conn.exec_driver_sql(statement, params)
    except DRIVER_ERRORS as error:
        if not _request_error(error):
            raise
        await conn.rollback()
        return postgres_message(error)
    return None


def _bad_value(value: _Value, reason: str) -> ApiError:
    f = value.filter
    return bad_parameter(
        f.parameter,
        f"{value.text!r} is not a valid {f.column.type} for column '{f.column.name}': {reason}",
    )


async def _locate(conn: AsyncConnection, values: list[_Value],
                  probes: list[_Probe]) -> ApiError | None:
    """After a failed check: the filter to blame. Round trips only for bad requests: one
    per operator, then a bisection over the values (about log2(n) casts)."""
    for probe in probes:
        reason = await _fails(conn, f"SELECT {probe.sql}", ())
        if reason is not None:
            return bad_parameter(probe.parameter, f"{probe.problem}: {reason}")
    if not values:
        return None
    # Invariant: values[:good] cast cleanly, values[:bad] do not.
    reason = await _fails(conn, *_cast_check(values, []))
    if reason is None:
        return None
    good, bad = 0, len(values)
    while bad - good > 1:
        middle = (good + bad) // 2
        failure = await _fails(conn, *_cast_check(values[:middle], []))
        if failure is None:
            good = middle
        else:
            bad, reason = middle, failure
    return _bad_value(values[bad - 1], reason)


async def check_values(conn: AsyncConnection, query: ExportQuery) -> None:
    """Ask PostgreSQL whether each filter value is valid input for its column's type, and
    whether the column's type has the filter's operator (and, for `order`, an ordering).

    One round trip when all is well; values travel as bound arrays, whatever their number.
    Raises a 400 naming the parameter of the first bad value. On a bad request the
    connection's transaction is rolled back (the export is not going to run).
    """
    filters = _typed_filters(query)
    if not filters and not query.order:
        return
    values = [_Value(f, v) for f in filters for v in f.values]
    probes = _probes(query, filters)
    soft = bool(values) and (conn.dialect.server_version_info or (0,)) >= _SOFT_CHECKS_FROM
    statement, params = (_soft_check if soft else _cast_check)(values, probes)
    try:
        row: Any = (await conn.exec_driver_sql(statement, params)).first()
    except DRIVER_ERRORS as error:
        if not _request_error(error):
            raise
        await conn.rollback()
        located = await _locate(conn, values, probes)
        if located is None:
            raise
        raise located from None
    if soft and row is not None:
        raise _bad_value(values[row[0] - 1], row[1])
