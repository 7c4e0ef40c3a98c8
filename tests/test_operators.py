"""The filter operators' one table (exporter/exports/operators.py), walked row by row: every
operator parses, renders SQL whose only request text is in quoted literals, is probed and
cast by the value checks as its row says, and is offered by the page's builder, whose
JavaScript knows no operator of its own. Pure: no server, no database."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from exporter.access.principal import ANONYMOUS
from exporter.errors import ApiError
from exporter.exports import sql
from exporter.exports.catalog import Column, Dataset
from exporter.exports.openapi import EXPORT
from exporter.exports.operators import BY_NAME, NAMES, TABLE, Operand, Operator
from exporter.exports.query import ExportQuery, parse
from exporter.web import page

TEXT = Column("note", "text", "text", "S", True)
NUMBER = Column("amount", "numeric(12,2)", "numeric", "N", False)
FLAG = Column("paid", "boolean", "boolean", "B", True)
DATASET = Dataset("exports", "orders", "table", 10, {c.name: c for c in (TEXT, NUMBER, FLAG)})

# Request text that would change the statement if it ever reached SQL unquoted.
HOSTILE = "x'); DROP TABLE t; --"
LITERAL = re.compile(r"'(?:[^']|'')*'")
PAGE_JS = Path(page.__file__).parent / "templates" / "page.js"


def operands(op: Operator) -> list[tuple[str, tuple[str, ...]]]:
    """(operand as written in the URL, values the filter should carry) for the row."""
    if op.operand is Operand.KEYWORD:
        return [(word, ()) for word, _ in op.keywords]
    if op.operand is Operand.LIST:
        return [(f'(1,"{HOSTILE}")', ("1", HOSTILE)), ("()", ())]
    if op.operand is Operand.PATTERN:
        return [(f"*{HOSTILE}*", (f"%{HOSTILE}%",))]
    return [(HOSTILE, (HOSTILE,))]


def column_for(op: Operator, operand: str) -> Column:
    if op.operand is Operand.KEYWORD and operand in ("true", "false", "unknown"):
        return FLAG
    # A pattern on a non-text column compares the column's text.
    return NUMBER if op.operand is not Operand.PATTERN else TEXT


def where(query: ExportQuery) -> str:
    return sql.select_sql(query).split(" WHERE ", 1)[1]


def test_names_are_unique_and_in_the_grammars_order() -> None:
    assert NAMES == ("eq", "neq", "gt", "gte", "lt", "lte", "like", "ilike", "in", "is",
                     "isdistinct", "match", "imatch", "cs", "cd", "ov", "fts", "plfts", "phfts",
                     "wfts")
    assert len(BY_NAME) == len(TABLE)


@pytest.mark.parametrize("op", TABLE, ids=NAMES)
def test_every_row_is_whole(op: Operator) -> None:
    assert "{column}" in op.sql and "{value}" in op.sql
    # Cast values need an operator their type is asked about; the rest are never cast.
    assert op.cast == (op.compares is not None)
    assert (op.operand is Operand.KEYWORD) == bool(op.keywords)
    # A label in words (a code is no label), except where the code is the word.
    assert op.label and (op.label != op.name or op.name == "is")


@pytest.mark.parametrize("op", TABLE, ids=NAMES)
@pytest.mark.parametrize("negated", [False, True])
def test_every_operator_parses_and_renders_its_template(op: Operator, negated: bool) -> None:
    for operand, values in operands(op):
        column = column_for(op, operand)
        text = f"{'not.' if negated else ''}{op.name}.{operand}"
        query = parse(DATASET, [(column.name, text)])
        [f] = query.filters
        assert (f.operator, f.values, f.negated, f.column) == (op.name, values, negated, column)

        rendered = where(query)
        # The request's text is in quoted literals only, each holding one value whole.
        literals = [m[1:-1].replace("''", "'") for m in LITERAL.findall(rendered)]
        assert literals == list(values)
        skeleton = LITERAL.sub("?", rendered)
        assert "DROP" not in skeleton and HOSTILE not in skeleton

        name = sql.quote_ident(column.name)
        if op.operand is Operand.KEYWORD:
            value = dict(op.keywords)[operand]
        elif op.operand in (Operand.PATTERN, Operand.REGEX, Operand.TSQUERY):
            value = "?"
        else:
            value = ", ".join(f"?::{column.base_type}" for _ in values)
        if op.operand is Operand.LIST and not values:
            expected = "false"
        else:
            # Patterns, regular expressions and text searches read a number's text.
            target = name + ("::text" if op.operand in (Operand.PATTERN, Operand.REGEX,
                                                        Operand.TSQUERY)
                             and column.category != "S" else "")
            if op.operand is Operand.TSQUERY:
                target = f"to_tsvector({target})"
            expected = op.sql.format(column=target, value=value)
        assert skeleton == (f"NOT ({expected})" if negated else expected)


def test_a_pattern_on_a_number_compares_its_text() -> None:
    query = parse(DATASET, [("amount", "like.1*")])
    assert where(query) == "\"amount\"::text LIKE '1%'"


@pytest.mark.parametrize("op", TABLE, ids=NAMES)
def test_value_checks_cast_and_probe_what_the_row_says(op: Operator) -> None:
    operand, _ = operands(op)[0]
    column = column_for(op, operand)
    query = parse(DATASET, [(column.name, f"{op.name}.{operand}")])
    typed = sql._typed_filters(query)
    assert typed == (query.filters if op.cast else [])
    probes = sql._probes(query, typed)
    assert [p.sql for p in probes] == (
        [f"(CAST(NULL AS {column.type}) {op.compares} CAST(NULL AS {column.base_type})) IS NULL"]
        if op.cast else [])


def test_an_unknown_operator_lists_the_table() -> None:
    with pytest.raises(ApiError) as caught:
        parse(DATASET, [("amount", "approx.5")])
    assert caught.value.status == 400 and caught.value.message == (
        "expected operator.value with operator one of eq, neq, gt, gte, lt, lte, like, ilike,"
        " in, is, isdistinct, match, imatch, cs, cd, ov, fts, plfts, phfts, wfts")


def test_the_openapi_description_lists_the_table() -> None:
    [filters] = [p for p in EXPORT["parameters"] if p["name"] == "filters"]
    assert f"one of {' '.join(NAMES)}," in filters["description"]


def test_every_operator_is_on_the_pages_builder() -> None:
    dataset = {"name": "orders", "kind": "table", "estimated_rows": 10,
               "columns": [{"name": "amount", "type": "numeric(12,2)"}],
               "urls": {"csv": "/datasets/orders.csv", "ndjson": "/datasets/orders.ndjson"}}
    html = page.templates.env.get_template("page.html").render(
        principal=ANONYMOUS, signed_in=False, cookie_rejected=False, sign_in_failed=False,
        datasets=[dataset], folder=None, folder_error=None, crumbs=[],
        operators=page.builder_operators(), reserved=[], formats=["csv", "ndjson"], root="",
    )
    match = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', html,
                      re.S)
    assert match is not None
    offered = json.loads(match[1])["operators"]
    assert offered == [{"name": o.name, "label": o.label, "hint": o.hint,
                        "list": o.operand is Operand.LIST} for o in TABLE]


# Comments, regular expression literals (after `(`, as page.js writes them) and strings.
_JS_TOKEN = re.compile(r"""//[^\n]*|/\*.*?\*/|(?<=\()/(?:\\.|[^/\\\n])+/[a-z]*"""
                       r"""|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`(?:\\.|[^`\\])*`""", re.S)


def test_page_js_holds_no_operator_names_of_its_own() -> None:
    js = PAGE_JS.read_text()
    strings = [t[1:-1] for t in _JS_TOKEN.findall(js) if t[0] in "\"'`"]
    code = _JS_TOKEN.sub(" ", js)
    assert strings and "getElementById" in code  # the tokenizer kept the code
    names = set(NAMES)
    assert [s for s in strings if s in names or s.split(".")[0] in names] == []
    # As object keys ({ in: "a,b,c" }) or properties (hints.like).
    keys = re.findall(r"[{,]\s*(\w+)\s*:", code) + re.findall(r"\.\s*(\w+)", code)
    assert [k for k in keys if k in names] == []
