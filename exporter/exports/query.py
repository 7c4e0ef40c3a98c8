"""The query string of an export, in PostgREST's grammar, parsed into an ExportQuery.

    select=a,b  order=a.desc,b.asc.nullslast  limit=10  offset=20
    column=op.value   with op one of operators.py's table, and not.op
    "column"=op.value the same, for any column name, also `limit` or `~by`
    since=CURSOR      the rows changed since an export's Export-Cursor (cursor.py)

A parameter name in double quotes is always a column (`""` inside for a quote, as in
SQL), so no column is out of reach: `select`, `order`, `limit`, `offset` and a signed
link's `~expires`, `~by`, `~signature` keep their meaning unquoted.

Parsing checks names and grammar against the dataset; values are checked against
the column types by the database (see sql.py), since only it knows every type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from exporter.access.links import LINK_PARAMETERS
from exporter.errors import ApiError, bad_parameter
from exporter.exports.catalog import Column, Dataset
from exporter.exports.cursor import Cursor
from exporter.exports.operators import BOOLEAN_KEYWORDS, BY_NAME, NAMES, Operand

# Parameters that are not filters unless quoted: the query's own, and a signed link's
# (which the route takes out of a link's query before parsing; elsewhere they are a 400).
QUERY_PARAMETERS = ("select", "order", "limit", "offset", "since")
RESERVED = {*QUERY_PARAMETERS, *LINK_PARAMETERS}
MAX_BIGINT = 2**63 - 1
# PostgreSQL refuses a SELECT of more columns ("target lists can have at most 1664
# entries"): a longer `select` is the client's mistake, not the database's failure.
MAX_SELECT = 1664


@dataclass(frozen=True)
class Filter:
    parameter: str
    column: Column
    operator: str
    values: tuple[str, ...]  # one value, or a LIST operand's; empty for a KEYWORD
    negated: bool = False
    is_value: str | None = None  # a KEYWORD operand, as SQL


@dataclass(frozen=True)
class Order:
    column: Column
    descending: bool = False
    nulls: str | None = None  # "FIRST" | "LAST"


@dataclass
class ExportQuery:
    dataset: Dataset
    columns: list[Column]
    filters: list[Filter] = field(default_factory=list)
    order: list[Order] = field(default_factory=list)
    limit: int | None = None
    offset: int | None = None
    # `since` as given; the service checks it and sets `changed_since` (cursor.py).
    since: str | None = None
    changed_since: Cursor | None = None
    # The xid the export transaction's age() counts from, once read (cursor.py).
    since_reference: int | None = None


def parse(dataset: Dataset, params: Iterable[tuple[str, str]]) -> ExportQuery:
    query = ExportQuery(dataset, list(dataset.columns.values()))
    seen: set[str] = set()
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            raise bad_parameter(name.replace("\x00", ""), "NUL bytes are not allowed")
        if name.startswith('"'):
            query.filters.append(_parse_filter(dataset, name, _unquote(name), value))
            continue
        if name in LINK_PARAMETERS:
            raise bad_parameter(name, f"'{name}' belongs to signed links, and this request is"
                                " not one" + _how_to_filter(dataset, name))
        if name in RESERVED:
            if name in seen:
                raise bad_parameter(name, f"'{name}' given more than once")
            seen.add(name)
            try:
                _parse_reserved(query, name, value)
            except ApiError as error:
                error.message += _how_to_filter(dataset, name)
                raise
        else:
            query.filters.append(_parse_filter(dataset, name, name, value))
    return query


def _parse_reserved(query: ExportQuery, name: str, value: str) -> None:
    if name == "select":
        query.columns = _parse_select(query.dataset, value)
    elif name == "order":
        query.order = _parse_order(query.dataset, value)
    elif name == "since":
        query.since = value
    else:
        setattr(query, name, _parse_count(name, value))


def _how_to_filter(dataset: Dataset, name: str) -> str:
    """For a 400 about a reserved name that is also a column: how to reach the column."""
    if name not in dataset.columns:
        return ""
    return (f"; to filter the column '{name}', put its name in double quotes:"
            f' "{name}"=eq.VALUE')


def _unquote(parameter: str) -> str:
    """`"name"` as a column name: SQL's quoted identifier, `""` standing for `"`."""
    inner = parameter[1:-1]
    if len(parameter) < 3 or not parameter.endswith('"') or '"' in inner.replace('""', ""):
        raise bad_parameter(parameter, 'a quoted column name is "name", with "" for a quote'
                            " inside it")
    return inner.replace('""', '"')


def _column(dataset: Dataset, parameter: str, name: str) -> Column:
    column = dataset.columns.get(name)
    if column is None:
        raise bad_parameter(
            parameter, f"unknown column '{name}' in dataset '{dataset.name}'"
        )
    return column


def _parse_select(dataset: Dataset, value: str) -> list[Column]:
    names = [n.strip() for n in value.split(",")]
    if not value.strip() or any(not n for n in names):
        raise bad_parameter("select", "expected a comma-separated list of columns")
    if len(names) > MAX_SELECT:
        raise bad_parameter("select", f"at most {MAX_SELECT} columns may be selected")
    return [_column(dataset, "select", n) for n in names]


def _parse_order(dataset: Dataset, value: str) -> list[Order]:
    orders = []
    for term in value.split(","):
        name, *modifiers = term.strip().split(".")
        column = _column(dataset, "order", name)
        descending, nulls = False, None
        for modifier in modifiers:
            if modifier in ("asc", "desc"):
                descending = modifier == "desc"
            elif modifier in ("nullsfirst", "nullslast"):
                nulls = modifier[5:].upper()
            else:
                raise bad_parameter(
                    "order",
                    f"unknown order modifier '{modifier}' (asc, desc, nullsfirst, nullslast)",
                )
        orders.append(Order(column, descending, nulls))
    return orders


def _parse_count(name: str, value: str) -> int:
    # The length first: int() refuses more than 4300 digits with a ValueError.
    if (not value.isascii() or not value.isdigit() or len(value.lstrip("0")) > 19
            or int(value) > MAX_BIGINT):
        raise bad_parameter(name, f"'{name}' must be a whole number from 0 to {MAX_BIGINT}")
    return int(value)


def _parse_filter(dataset: Dataset, name: str, column_name: str, value: str) -> Filter:
    """`name` is the parameter as given, `column_name` the column it names."""
    column = _column(dataset, name, column_name)
    negated = value.startswith("not.")
    if negated:
        value = value[4:]
    op_name, dot, operand = value.partition(".")
    operator = BY_NAME.get(op_name)
    if not dot or operator is None:
        raise bad_parameter(
            name, f"expected operator.value with operator one of {', '.join(NAMES)}"
        )
    if operator.operand is Operand.KEYWORD:
        keywords = dict(operator.keywords)
        if operand not in keywords:
            raise bad_parameter(name, f"'{operator.name}' takes one of {', '.join(keywords)}")
        if operand in BOOLEAN_KEYWORDS and column.category != "B":
            raise bad_parameter(name, f"'{operator.name}.{operand}' needs a boolean column")
        return Filter(name, column, operator.name, (), negated, keywords[operand])
    if operator.operand is Operand.LIST:
        return Filter(name, column, operator.name, tuple(_parse_list(name, operand)), negated)
    if operator.operand is Operand.PATTERN:
        # PostgREST spells the % wildcard as *, which needs no URL encoding.
        operand = operand.replace("*", "%")
        # PostgreSQL fails on such a pattern only once a row matches up to its end,
        # perhaps mid-download: refuse it before.
        if (len(operand) - len(operand.rstrip("\\"))) % 2:
            raise bad_parameter(name, f"a {operator.name} pattern may not end with a lone \\")
    return Filter(name, column, operator.name, (operand,), negated)


def _parse_list(parameter: str, text: str) -> list[str]:
    """`(a,b,"c,d")`: PostgREST's list, where double quotes keep commas and parentheses."""
    if not (text.startswith("(") and text.endswith(")")):
        raise bad_parameter(parameter, "'in' takes a list in parentheses: in.(a,b)")
    body = text[1:-1]
    if not body:
        return []
    items: list[str] = []
    current: list[str] = []
    quoted = False
    was_quoted = False
    i = 0
    while i < len(body):
        ch = body[i]
        if quoted:
            if ch == "\\" and i + 1 < len(body):
                i += 1
                current.append(body[i])
            elif ch == '"':
                quoted = False
            else:
                current.append(ch)
        elif ch == '"' and not current:
            quoted = was_quoted = True
        elif ch == ",":
            items.append("".join(current) if was_quoted else "".join(current).strip())
            current, was_quoted = [], False
        else:
            current.append(ch)
        i += 1
    if quoted:
        raise bad_parameter(parameter, "unterminated double quote in list")
    items.append("".join(current) if was_quoted else "".join(current).strip())
    return items
