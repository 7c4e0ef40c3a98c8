"""The query string of an export, in PostgREST's grammar, parsed into an ExportQuery.

    select=a,b  order=a.desc,b.asc.nullslast  limit=10  offset=20
    column=op.value   with op in eq neq gt gte lt lte like ilike in is, and not.op

Parsing checks names and grammar against the dataset; values are checked against
the column types by the database (see sql.py), since only it knows every type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from exporter.catalog import Column, Dataset
from exporter.errors import bad_parameter

COMPARISONS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
PATTERNS = {"like": "LIKE", "ilike": "ILIKE"}
IS_VALUES = {"null": "NULL", "not_null": "NOT NULL", "true": "TRUE", "false": "FALSE",
             "unknown": "UNKNOWN"}
OPERATORS = [*COMPARISONS, *PATTERNS, "in", "is"]

# Parameters that are not filters: the query's own, and a signed link's.
RESERVED = {"select", "order", "limit", "offset", "expires", "by", "signature"}
MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True)
class Filter:
    parameter: str
    column: Column
    operator: str
    values: tuple[str, ...]  # one value, or the list of `in`; empty for `is`
    negated: bool = False
    is_value: str | None = None


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


def parse(dataset: Dataset, params: Iterable[tuple[str, str]]) -> ExportQuery:
    query = ExportQuery(dataset, list(dataset.columns.values()))
    seen: set[str] = set()
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            raise bad_parameter(name.replace("\x00", ""), "NUL bytes are not allowed")
        if name in RESERVED:
            if name in seen:
                raise bad_parameter(name, f"'{name}' given more than once")
            seen.add(name)
        if name == "select":
            query.columns = _parse_select(dataset, value)
        elif name == "order":
            query.order = _parse_order(dataset, value)
        elif name in ("limit", "offset"):
            setattr(query, name, _parse_count(name, value))
        elif name in RESERVED:
            continue
        else:
            query.filters.append(_parse_filter(dataset, name, value))
    return query


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


def _parse_filter(dataset: Dataset, name: str, value: str) -> Filter:
    column = _column(dataset, name, name)
    negated = value.startswith("not.")
    if negated:
        value = value[4:]
    operator, dot, operand = value.partition(".")
    if not dot or operator not in OPERATORS:
        raise bad_parameter(
            name, f"expected operator.value with operator one of {', '.join(OPERATORS)}"
        )
    if operator == "is":
        if operand not in IS_VALUES:
            raise bad_parameter(name, f"'is' takes one of {', '.join(IS_VALUES)}")
        if operand in ("true", "false", "unknown") and column.category != "B":
            raise bad_parameter(name, f"'is.{operand}' needs a boolean column")
        return Filter(name, column, operator, (), negated, IS_VALUES[operand])
    if operator == "in":
        return Filter(name, column, operator, tuple(_parse_list(name, operand)), negated)
    if operator in PATTERNS:
        # PostgREST spells the % wildcard as *, which needs no URL encoding.
        operand = operand.replace("*", "%")
    return Filter(name, column, operator, (operand,), negated)


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
