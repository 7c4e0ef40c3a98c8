"""Building the SQL of an export: the one place where text becomes SQL.

COPY cannot take bind parameters, so the SELECT inside it carries its values as
literals. Every value is first checked by PostgreSQL through bound parameters
(`check_values`), then written as a quoted literal cast to the column's type;
identifiers come from the catalog and are always quoted. The connection runs with
`standard_conforming_strings = on` (see db.py), so doubling the single quote is the
whole of literal quoting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from exporter.errors import DRIVER_ERRORS, ApiError, bad_parameter, postgres_message, sqlstate
from exporter.exports import cursor
from exporter.exports.operators import BY_NAME, Operand
from exporter.exports.query import INDEX, ExportQuery, Filter, Item, Step, Tree, cast_type


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    """A relation's name as SQL: `"schema"."name"`."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def quote_literal(value: str) -> str:
    if "\x00" in value:
        raise ValueError("PostgreSQL text cannot hold NUL bytes")
    return "'" + value.replace("'", "''") + "'"


def _typed(value: str, pg_type: str) -> str:
    # pg_type comes from format_type() in the catalog, never from the request.
    return f"{quote_literal(value)}::{pg_type}"


def field_sql(column: str, path: tuple[Step, ...] = ()) -> str:
    """A column, followed along its JSON path: keys as literals, indexes as numbers; in
    parentheses, so that a cast or an operator after it applies to the whole."""
    sql = quote_ident(column)
    if not path:
        return sql
    for step in path:
        # `->-1` would read as an operator `->-`.
        key = f"({int(step.key)})" if INDEX.fullmatch(step.key) else quote_literal(step.key)
        sql += f"{step.arrow}{key}"
    return f"({sql})"


def _condition(f: Filter) -> str:
    operator = BY_NAME[f.operator]
    column = field_sql(f.column.name, f.path)
    if operator.operand in (Operand.PATTERN, Operand.REGEX) and f.category != "S":
        column += "::text"
    elif operator.operand is Operand.TSQUERY and f.base_type != "tsvector":
        # PostgREST searches text and json columns as their to_tsvector().
        if f.category != "S" and f.base_type not in ("json", "jsonb"):
            column += "::text"
        language = f"{_language(f)}, " if f.language is not None else ""
        column = f"to_tsvector({language}{column})"
    if operator.operand is Operand.LIST and not f.values:
        condition = "false"  # `IN ()` is not SQL; an empty list matches no row
    elif f.quantifier is not None and not f.values:
        # As SQL's `= ANY ('{}')` and `= ALL ('{}')` answer.
        condition = "false" if f.quantifier == "ANY" else "true"
    else:
        condition = operator.sql.format(column=column, value=_operand(f, operator.operand))
    return f"NOT ({condition})" if f.negated else condition


def _language(f: Filter) -> str:
    # A literal, checked as a regconfig by check_values before the export runs.
    assert f.language is not None
    return f"{quote_literal(f.language)}::regconfig"


def _operand(f: Filter, kind: Operand) -> str:
    if kind is Operand.KEYWORD:
        assert f.is_value is not None  # the parser's own SQL words, not the request's text
        return f.is_value
    if kind in (Operand.PATTERN, Operand.REGEX):
        values = [quote_literal(v) for v in f.values]
    elif kind is Operand.TSQUERY:
        language = f"{_language(f)}, " if f.language is not None else ""
        return language + quote_literal(f.values[0])
    else:
        values = [_typed(v, f.base_type) for v in f.values]
    if f.quantifier is not None:
        return f"{f.quantifier} (ARRAY[{', '.join(values)}])"
    return ", ".join(values)


def _tree(t: Tree) -> str:
    # Depth is bounded by the parser (query.MAX_DEPTH).
    joined = f" {t.conjunction} ".join(
        _tree(c) if isinstance(c, Tree) else _condition(c) for c in t.children)
    return f"NOT ({joined})" if t.negated else f"({joined})"


def _item(query: ExportQuery, item: Item) -> str:
    if item.plain:
        return _output(query, quote_ident(item.column.name), item.column.name)
    sql = field_sql(item.column.name, item.path)
    if item.cast is not None:
        # The type as PostgreSQL named it in check_values, never the request's text.
        sql = f"CAST({sql} AS {query.types[item.cast]})"
    return _output(query, sql, item.name)


# What makes a spreadsheet read a cell as a formula (OWASP's rule for CSV injection).
_FORMULA_STARTS = r"'=', '+', '-', '@', E'\t', E'\r'"


def _output(query: ExportQuery, sql: str, name: str) -> str:
    """An output column; in a formula-safe export each value is text, and one that a
    spreadsheet would run is written after a quote (`'=1+2`), as OWASP advises."""
    if not query.formula_safe:
        return sql if sql == quote_ident(name) else f"{sql} AS {quote_ident(name)}"
    text = f"({sql})::text"
    return (f"CASE WHEN left({text}, 1) IN ({_FORMULA_STARTS}) THEN '''' || {text}"
            f" ELSE {text} END AS {quote_ident(name)}")


# Heap blocks [first, end) of a table (end None: to the table's end), one ctid range.
Blocks = tuple[int, int | None]


def blocks_condition(blocks: Blocks) -> str:
    """The rows of heap blocks [first, end): PostgreSQL 14+ reads only those (a TID Range
    Scan), in block order, as a sequential scan would."""
    first, end = blocks
    parts = [f"ctid >= '({int(first)},0)'::tid"] if first > 0 else []
    if end is not None:
        parts.append(f"ctid < '({int(end)},0)'::tid")
    return "(" + " AND ".join(parts or ["true"]) + ")"


def select_sql(query: ExportQuery, blocks: Blocks | None = None,
               partition: tuple[str, str] | None = None) -> str:
    """The export's SELECT; with `blocks`, of the rows in those heap blocks only, with
    `partition` (schema, name), of that partition of the dataset only (parts of a
    parallel export: exports/parallel.py)."""
    ds = query.dataset
    columns = ([_item(query, i) for i in query.items] if query.items
               else [_output(query, quote_ident(c.name), c.name) for c in query.columns])
    # A partition has its parent's column names (its own column order does not matter:
    # they are named); ONLY, so that a sub-partitioned one is never read twice.
    source = (qualified(ds.schema, ds.name) if partition is None
              else f"ONLY {qualified(*partition)}")
    parts = ["SELECT " + ", ".join(columns), f"FROM {source}"]
    conditions = [_condition(f) for f in query.filters] + [_tree(t) for t in query.trees]
    if query.changed_since is not None:
        conditions.append(cursor.condition(query.changed_since, query.since_reference))
    if blocks is not None:
        conditions.append(blocks_condition(blocks))
    if conditions:
        parts.append("WHERE " + " AND ".join(conditions))
    if query.order:
        terms = []
        for o in query.order:
            term = field_sql(o.column.name, o.path) + (" DESC" if o.descending else " ASC")
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
# What PostgreSQL answers when statement_timeout (or a cancel request) stops a statement.
QUERY_CANCELED = "57014"
# The longest regular expression or text search query a filter may hold, in characters:
# what they cost PostgreSQL to compile and run grows with their size.
MAX_PATTERN_LENGTH = 1000
# Seconds PostgreSQL may spend compiling a request's regular expressions and parsing its
# text search queries (`((.{0,18}){0,18}){0,18}x\1` alone takes about 6 s to compile),
# and never more than the statement timeout. Past it, a 400 names the parameter.
COMPILE_TIMEOUT = 1.0


def timeout_setting(seconds: float) -> str:
    """`seconds` (0: never) as the `statement_timeout` setting, in milliseconds."""
    return str(0 if seconds <= 0 else max(1, math.ceil(seconds * 1000)))


async def limit_statements(conn: AsyncConnection, seconds: float) -> None:
    """PostgreSQL cancels every later statement of the transaction on `conn` that runs
    longer than `seconds` (0: never), whatever this process does meanwhile."""
    await conn.exec_driver_sql("SELECT set_config('statement_timeout', $1, true)",
                               (timeout_setting(seconds),))


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
    return [f for f in query.all_filters() if BY_NAME[f.operator].cast and f.values]


def _probes(query: ExportQuery, filters: list[Filter]) -> list[_Probe]:
    probes: dict[str, _Probe] = {}
    for f in filters:
        c = f.column
        operator = BY_NAME[f.operator].compares
        expression = f"(CAST(NULL AS {f.type}) {operator} CAST(NULL AS {f.base_type})) IS NULL"
        probes.setdefault(expression, _Probe(
            f.parameter, f"column '{c.name}' ({f.type}) cannot be compared with '{f.operator}'",
            expression,
        ))
    for o in query.order:
        c = o.column
        expression = f"EXISTS (SELECT 1 FROM (SELECT CAST(NULL AS {o.type}) AS x) AS o ORDER BY x)"
        probes.setdefault(expression, _Probe(
            "order", f"column '{c.name}' ({o.type}) cannot be ordered", expression,
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
    return statement, ([v.text for v in values], [v.filter.base_type for v in values])


def _cast_check(values: list[_Value], probes: list[_Probe]) -> tuple[str, tuple[Any, ...]]:
    """Any version: cast every value to its type at once, one array per type; fails on the
    first bad one without saying which. count() of the cast, so the planner keeps it."""
    by_type: dict[str, list[str]] = {}
    for v in values:
        by_type.setdefault(v.filter.base_type, []).append(v.text)
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


async def _fails(conn: AsyncConnection, statement: str, params: tuple[Any, ...],
                 limit: float | None = None) -> str | None:
    """Why the statement failed on the request's input, or None if it ran. A failure ends
    the transaction, so that the next statement can run. With `limit`, PostgreSQL may
    spend that many seconds on it, and running out is the input's failure too."""
    if limit is not None:
        await limit_statements(conn, limit)
    try:
        await conn.exec_driver_sql(statement, params)
    except DRIVER_ERRORS as error:
        timed_out = limit is not None and sqlstate(error) == QUERY_CANCELED
        if not (timed_out or _request_error(error)):
            raise
        await conn.rollback()
        if timed_out:
            return f"PostgreSQL took more than {limit:g} s to compile it"
        return postgres_message(error)
    return None


def _bad_value(value: _Value, reason: str) -> ApiError:
    f = value.filter
    return bad_parameter(
        f.parameter,
        f"{value.text!r} is not a valid {f.type} for column '{f.column.name}': {reason}",
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
    failed = await _first_failure(conn, len(values), lambda n: _cast_check(values[:n], []))
    if failed is None:
        return None
    bad, reason = failed
    return _bad_value(values[bad], reason)


async def check_values(conn: AsyncConnection, query: ExportQuery,
                       statement_timeout: float) -> None:
    """Ask PostgreSQL whether each filter value is valid input for its column's type, and
    whether the column's type has the filter's operator (and, for `order`, an ordering);
    resolve the types of `select`'s casts; compile regular expressions and text search
    queries; and, for the grammar beyond plain columns and values, plan the statement.

    One round trip when all is well for plain queries; values travel as bound arrays,
    whatever their number. Raises a 400 naming the parameter of the first bad value. On
    a bad request the connection's transaction is rolled back (the export is not going
    to run). `statement_timeout`: the one the transaction runs with (its patterns are
    compiled under a shorter one, COMPILE_TIMEOUT, then it is set back).
    """
    await _resolve_casts(conn, query)
    await _check_typed(conn, query)
    await _check_operands(conn, query, statement_timeout)
    await _check_statement(conn, query)


async def _check_typed(conn: AsyncConnection, query: ExportQuery) -> None:
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


# The types a `select` cast may name: PostgreSQL's ordinary scalar types and their arrays,
# and the types of the exports' own schema. Nothing else: the OID aliases (`regclass`,
# `regrole`, ... and any `reg*` to come) turn numbers into catalog names, and others
# (`xml`, `pg_lsn`, `pg_snapshot`, `aclitem`, `tid`, ...) tell of the server itself.
CAST_TYPES = (
    "bool", "bytea", "char", "name", "int2", "int4", "int8", "float4", "float8", "numeric",
    "money", "text", "varchar", "bpchar", "date", "time", "timetz", "timestamp",
    "timestamptz", "interval", "uuid", "json", "jsonb", "bit", "varbit", "inet", "cidr",
    "macaddr", "macaddr8", "point", "line", "lseg", "box", "path", "polygon", "circle",
    "int4range", "int8range", "numrange", "daterange", "tsrange", "tstzrange",
    "int4multirange", "int8multirange", "nummultirange", "datemultirange",
    "tsmultirange", "tstzmultirange",
)
# Types whose values a cast pads to their declared width, and how far it may: the output
# of an export grows with its rows, not with the length of its URL.
PADDED = ("bpchar", "character", "bit")
MAX_PADDED_WIDTH = 1000
MAX_PADDED_ROW = 10_000
# The type a cast's words name, as PostgreSQL spells it (format_type(oid, -1) parses back
# unmodified, as in the catalog), whether it is a pseudo-type, which holds no values, and
# whether it (an array: its element) is one of CAST_TYPES or the exports schema's.
_RESOLVE_TYPES = (
    "SELECT format_type(r.t, -1), t.typtype = 'p',"
    " coalesce((e.typnamespace = 'pg_catalog'::regnamespace AND e.typname = ANY($2::text[]))"
    "  OR e.typnamespace = to_regnamespace($3)::oid, false)"
    " FROM unnest($1::text[]) WITH ORDINALITY AS c(n, ord)"
    " CROSS JOIN LATERAL (SELECT to_regtype(c.n)::oid AS t) AS r"
    " LEFT JOIN pg_type t ON t.oid = r.t"
    " LEFT JOIN pg_type e ON e.oid = CASE WHEN t.typcategory = 'A' THEN t.typelem"
    "  ELSE t.oid END"
    " ORDER BY c.ord"
)


async def _resolve_casts(conn: AsyncConnection, query: ExportQuery) -> None:
    """Fill query.types: a cast's type is looked up by PostgreSQL from bound text, and
    only the name it gives back (and the modifier's and brackets' digits) reach SQL."""
    casts = sorted({i.cast for i in query.items if i.cast is not None} - set(query.types))
    if not casts:
        return
    names = [cast_type(c)[0] for c in casts]
    try:
        rows: list[Any] = list((await conn.exec_driver_sql(
            _RESOLVE_TYPES, (names, list(CAST_TYPES), query.dataset.schema))).all())
    except DRIVER_ERRORS as error:
        if not _request_error(error):
            raise
        await conn.rollback()
        raise bad_parameter("select", f"a cast names no type: {postgres_message(error)}"
                            ) from None
    padded = 0
    for cast, row in zip(casts, rows, strict=True):
        name, pseudo, allowed = row[0], row[1], row[2]
        if name is None:
            raise bad_parameter("select", f"unknown type '{cast}'")
        if pseudo:
            raise bad_parameter("select", f"'{cast}' is a pseudo-type: nothing can be cast"
                                " to it")
        if not allowed:
            raise bad_parameter("select", f"casts to '{name}' are not allowed: a cast names"
                                " one of PostgreSQL's ordinary types (numbers, text, times,"
                                " json, uuid, ...), an array of one, or a type of the"
                                f" schema '{query.dataset.schema}'")
        _, modifier, array = cast_type(cast)
        if name in PADDED and modifier:
            # char(9999) writes 9,999 bytes whatever the value: a short URL would make
            # megabytes of every row (docs/query.md).
            width = int(modifier.strip("()").split(",")[0])
            padded += width * sum(1 for i in query.items if i.cast == cast)
            if width > MAX_PADDED_WIDTH or padded > MAX_PADDED_ROW:
                raise bad_parameter("select", f"casts to fixed-width types ({name}(n)) may"
                                    f" pad at most {MAX_PADDED_WIDTH} characters a value"
                                    f" and {MAX_PADDED_ROW} a row")
        query.types[cast] = f"{name}{modifier}{array}"


# Every regular expression compiled, each operand of a text search parsed with its
# language (a regconfig), as the export's own statement would, but before it runs: a bad
# one fails only once a row is evaluated, perhaps mid-download.
_REGEX_CHECK = "SELECT count(*) FROM unnest($1::text[]) AS p(v) WHERE '' ~ p.v"
_TSQUERY_CHECK = (
    "SELECT count(numnode(CASE s.f WHEN 'fts' THEN to_tsquery(c.l, s.q)"
    " WHEN 'plfts' THEN plainto_tsquery(c.l, s.q) WHEN 'phfts' THEN phraseto_tsquery(c.l, s.q)"
    " ELSE websearch_to_tsquery(c.l, s.q) END))"
    " FROM unnest($1::text[], $2::text[], $3::text[]) AS s(f, l, q),"
    " LATERAL (SELECT coalesce(s.l, current_setting('default_text_search_config'))::regconfig"
    " AS l) AS c"
)


async def _check_operands(conn: AsyncConnection, query: ExportQuery,
                          statement_timeout: float) -> None:
    filters = query.all_filters()
    regexes = [_Value(f, v) for f in filters
               if BY_NAME[f.operator].operand is Operand.REGEX for v in f.values]
    searches = [f for f in filters if BY_NAME[f.operator].operand is Operand.TSQUERY]
    for f, value in [(v.filter, v.text) for v in regexes] + [(f, f.values[0]) for f in searches]:
        if len(value) > MAX_PATTERN_LENGTH:
            raise bad_parameter(f.parameter, f"a pattern of {len(value)} characters: at most"
                                f" {MAX_PATTERN_LENGTH} are allowed")
    if not regexes and not searches:
        return
    limit = min(COMPILE_TIMEOUT, statement_timeout)
    if regexes:
        failed = await _first_failure(
            conn, len(regexes), lambda n: (_REGEX_CHECK, ([v.text for v in regexes[:n]],)),
            limit)
        if failed is not None:
            bad, reason = failed
            raise bad_parameter(regexes[bad].filter.parameter,
                                f"{regexes[bad].text!r} is not a valid regular expression:"
                                f" {reason}")
    if searches:
        failed = await _first_failure(conn, len(searches), lambda n: (_TSQUERY_CHECK, (
            [f.operator for f in searches[:n]], [f.language for f in searches[:n]],
            [f.values[0] for f in searches[:n]])), limit)
        if failed is not None:
            bad, reason = failed
            f = searches[bad]
            raise bad_parameter(f.parameter, f"{f.values[0]!r} is not a valid '{f.operator}'"
                                + (f" in '{f.language}'" if f.language is not None else "")
                                + f": {reason}")
    await limit_statements(conn, statement_timeout)


async def _first_failure(conn: AsyncConnection, count: int,
                         statement: Callable[[int], tuple[str, tuple[Any, ...]]],
                         limit: float | None = None) -> tuple[int, str] | None:
    """The index of the first of `count` inputs on which statement(n), which checks the
    first n, fails, and why; None if all pass. One round trip when all is well, then a
    bisection (about log2(count)); `limit`, as _fails takes it.

    Invariant: the first `good` inputs pass, the first `bad` do not."""
    reason = await _fails(conn, *statement(count), limit)
    if reason is None:
        return None
    good, bad = 0, count
    while bad - good > 1:
        middle = (good + bad) // 2
        failure = await _fails(conn, *statement(middle), limit)
        if failure is None:
            good = middle
        else:
            bad, reason = middle, failure
    return bad - 1, reason


def runs_checks(query: ExportQuery) -> bool:
    """Whether check_values sends PostgreSQL anything for `query` (a plain export of
    columns, `limit` and `offset` needs no statement before its COPY)."""
    return (any(i.cast is not None for i in query.items) or bool(query.order)
            or bool(_typed_filters(query)) or _needs_plan(query)
            or any(BY_NAME[f.operator].operand in (Operand.REGEX, Operand.TSQUERY)
                   for f in query.all_filters()))


def _needs_plan(query: ExportQuery) -> bool:
    """Whether the query uses the grammar whose mistakes only planning the statement
    shows: casts with no conversion, JSON paths, text search on a column's text."""
    return (any(not i.plain for i in query.items) or any(o.path for o in query.order)
            or any(f.path or BY_NAME[f.operator].operand is Operand.TSQUERY
                   for f in query.all_filters()))


async def _check_statement(conn: AsyncConnection, query: ExportQuery) -> None:
    """Plan the export's statement (LIMIT 0: no row is read); if PostgreSQL refuses it,
    blame the first part that it refuses alone."""
    if not _needs_plan(query):
        return
    reason = await _fails(conn, f"SELECT * FROM ({select_sql(query)}) AS s LIMIT 0", ())
    if reason is None:
        return
    table = qualified(query.dataset.schema, query.dataset.name)
    parts = [("select", f"SELECT {_item(query, i)} FROM {table} LIMIT 0")
             for i in query.items if not i.plain]
    parts += [("order", f"SELECT 1 FROM {table} ORDER BY {field_sql(o.column.name, o.path)}"
               " LIMIT 0") for o in query.order if o.path]
    parts += [(f.parameter, f"SELECT 1 FROM {table} WHERE {_condition(f)} LIMIT 0")
              for f in query.filters]
    parts += [(t.parameter, f"SELECT 1 FROM {table} WHERE {_tree(t)} LIMIT 0")
              for t in query.trees]
    for parameter, statement in parts:
        failure = await _fails(conn, statement, ())
        if failure is not None:
            raise bad_parameter(parameter, failure)
    raise bad_parameter("select", reason)


def cast_failure(query: ExportQuery, error: BaseException) -> ApiError | None:
    """A 400 for a statement that failed on a row's value, when `select` casts: no check
    can know before reading the rows that `word::int` meets 'Bob' (PostgREST answers 400
    too). None for any other failure."""
    code = sqlstate(error)
    if code is None or not code.startswith("22") or all(i.cast is None for i in query.items):
        return None
    return bad_parameter("select", f"a cast failed on a row: {postgres_message(error)}")
