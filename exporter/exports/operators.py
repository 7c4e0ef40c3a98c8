"""The filter operators of an export, one row each: `column=op.value` in a query string.

Every place that knows an operator reads this table: the parser (query.py) checks names
and operands against it, the SQL (sql.py) is rendered from its templates, the value
checks (sql.py's `check_values`) cast exactly the operands it says are typed, the page's
filter builder (web/page.py) offers its rows with their labels, and the OpenAPI
description lists its names. A new operator is a new row, if its operand is one of the
kinds below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class Operand(Enum):
    """What follows `op.`, and so how it is parsed, checked and written into SQL."""

    # One value, checked by PostgreSQL as input of the column's type (check_values) and
    # written as a literal cast to that type, so that it compares as the type does.
    TYPED = "typed"
    # `(a,b,"c,d")`: TYPED values, in PostgREST's list syntax.
    LIST = "list"
    # A LIKE pattern, `*` standing for `%`; compared as text, so never cast.
    PATTERN = "pattern"
    # One of the operator's keywords (`is.null`); SQL words, never a literal.
    KEYWORD = "keyword"
    # A POSIX regular expression, compared as text like a PATTERN; PostgreSQL compiles
    # it (check_values) before the export runs, since a bad one fails only on a row.
    REGEX = "regex"
    # A text search query, `fts(english).word` with an optional language (a regconfig);
    # both checked by PostgreSQL before the export runs.
    TSQUERY = "tsquery"


# Which column types an operator makes sense on, from the column's pg_type category
# (S string, N numeric, D date/time, T interval, A array, R range, ...) and base type.
# Only the page's builder asks, to offer a column its own operators; the grammar takes
# any operator on any column and PostgreSQL refuses what a type lacks (a 400).
Fits = Callable[[str, str], bool]


def _any(category: str, base_type: str) -> bool:
    return True


def _equatable(category: str, base_type: str) -> bool:
    return base_type not in ("json", "xml", "point")


def _ordered(category: str, base_type: str) -> bool:
    return category in tuple("NDTSEVI") or base_type == "uuid"


def _text(category: str, base_type: str) -> bool:
    return category == "S"


def _castable_to_text(category: str, base_type: str) -> bool:
    return category != "B"


def _container(category: str, base_type: str) -> bool:
    return category in ("A", "R") or base_type == "jsonb"


def _overlapping(category: str, base_type: str) -> bool:
    return category in ("A", "R")


def _searchable(category: str, base_type: str) -> bool:
    return category == "S" or base_type == "tsvector"


@dataclass(frozen=True)
class Operator:
    name: str  # in the URL: `id=gte.5`
    label: str  # on the page's builder, in words
    # `{column}` is the quoted column (cast to text for a pattern on a non-text column),
    # `{value}` the rendered operand: a typed literal, a list of them, or a keyword.
    sql: str
    operand: Operand
    # The SQL operator the column's type must have, which check_values asks PostgreSQL
    # about before the export runs (json has no =, point no <); `in` compares with =.
    compares: str | None = None
    # For KEYWORD: the accepted words and the SQL each stands for.
    keywords: tuple[tuple[str, str], ...] = ()
    hint: str = ""  # the placeholder of the page's value field
    # Whether `op(any).{a,b}` and `op(all).{a,b}` compare with each value of a list.
    quantified: bool = False
    fits: Fits = _any  # the column types the builder offers it for (see Fits)

    @property
    def cast(self) -> bool:
        """Whether the operand's values are cast to the column's type (and checked so)."""
        return self.operand in (Operand.TYPED, Operand.LIST)


# `is.true` and its like make sense on a boolean column only.
BOOLEAN_KEYWORDS = ("true", "false", "unknown")

TABLE: tuple[Operator, ...] = (
    Operator("eq", "equals", "{column} = {value}", Operand.TYPED, "=", quantified=True,
             fits=_equatable),
    Operator("neq", "does not equal", "{column} <> {value}", Operand.TYPED, "<>",
             quantified=True, fits=_equatable),
    Operator("gt", "is greater than", "{column} > {value}", Operand.TYPED, ">",
             quantified=True, fits=_ordered),
    Operator("gte", "is at least", "{column} >= {value}", Operand.TYPED, ">=", quantified=True,
             fits=_ordered),
    Operator("lt", "is less than", "{column} < {value}", Operand.TYPED, "<", quantified=True,
             fits=_ordered),
    Operator("lte", "is at most", "{column} <= {value}", Operand.TYPED, "<=", quantified=True,
             fits=_ordered),
    Operator("like", "matches", "{column} LIKE {value}", Operand.PATTERN,
             hint="use * as wildcard", quantified=True, fits=_castable_to_text),
    Operator("ilike", "matches, any case", "{column} ILIKE {value}", Operand.PATTERN,
             hint="use * as wildcard", quantified=True, fits=_castable_to_text),
    Operator("in", "is one of", "{column} IN ({value})", Operand.LIST, "=", hint="a,b,c",
             fits=_equatable),
    Operator("is", "is", "{column} IS {value}", Operand.KEYWORD,
             keywords=(("null", "NULL"), ("not_null", "NOT NULL"), ("true", "TRUE"),
                       ("false", "FALSE"), ("unknown", "UNKNOWN")),
             hint="null, not_null, true, false"),
    Operator("isdistinct", "is distinct from (nulls compared as values)",
             "{column} IS DISTINCT FROM {value}", Operand.TYPED, "=", fits=_equatable),
    Operator("match", "matches the regular expression", "{column} ~ {value}", Operand.REGEX,
             hint="a regular expression", quantified=True, fits=_text),
    Operator("imatch", "matches the regular expression, any case", "{column} ~* {value}",
             Operand.REGEX, hint="a regular expression", quantified=True, fits=_text),
    Operator("cs", "contains", "{column} @> {value}", Operand.TYPED, "@>",
             hint="{1,2} or [1,5)", fits=_container),
    Operator("cd", "is contained in", "{column} <@ {value}", Operand.TYPED, "<@",
             hint="{1,2} or [1,5)", fits=_container),
    Operator("ov", "overlaps", "{column} && {value}", Operand.TYPED, "&&",
             hint="{1,2} or [1,5)", fits=_overlapping),
    Operator("fts", "matches the text search query", "{column} @@ to_tsquery({value})",
             Operand.TSQUERY, hint="cat & (dog | mouse)", fits=_searchable),
    Operator("plfts", "contains the words", "{column} @@ plainto_tsquery({value})",
             Operand.TSQUERY, hint="some words", fits=_searchable),
    Operator("phfts", "contains the phrase", "{column} @@ phraseto_tsquery({value})",
             Operand.TSQUERY, hint="a phrase", fits=_searchable),
    Operator("wfts", "matches the web search", "{column} @@ websearch_to_tsquery({value})",
             Operand.TSQUERY, hint='"a phrase" or -not', fits=_searchable),
)

BY_NAME = {o.name: o for o in TABLE}
# In the table's order, which the 400 for an unknown operator lists.
NAMES = tuple(BY_NAME)
# PostgREST's operators that exporter leaves out (ranges' strictly left/right of, does
# not extend, adjacent): a 400 that says so, not one about an unknown column.
UNSUPPORTED = ("sl", "sr", "nxr", "nxl", "adj")
