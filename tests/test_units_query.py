"""Unit tests of the export grammar and its SQL: exporter/exports/query.py `parse` and
exporter/exports/sql.py, on a dataset built by hand. No server, no database: each case
names the exact columns, filters, SQL text and bound values it expects.

(tests/test_fuzz_parsers.py checks properties of the same parser on random input; what
PostgreSQL then makes of the SQL is tests/test_export_sql.py's.)"""

from __future__ import annotations

import pytest

from exporter.errors import ApiError
from exporter.exports import sql
from exporter.exports.catalog import Column, Dataset
from exporter.exports.query import MAX_BIGINT, ExportQuery, Filter, Order, parse


def column(name: str, type_: str, category: str, base_type: str | None = None) -> Column:
    return Column(name, type_, base_type or type_, category, nullable=True)


ID = column("id", "bigint", "N")
NOTE = column("note", "text", "S")
AMOUNT = column("amount", "numeric(12,2)", "N", "numeric")
PAID = column("paid", "boolean", "B")
CODE = column("code", "character(3)", "S", "bpchar")
CREATED = column("created_at", "timestamp with time zone", "D")
# Columns named like the query's own parameters, and one with a quote in its name.
LIMIT = column("limit", "integer", "N")
BY = column("~by", "text", "S")
QUOTED = column('say "hi"', "text", "S")
COLUMNS = [ID, NOTE, AMOUNT, PAID, CODE, CREATED, LIMIT, BY, QUOTED]
ORDERS = Dataset("exports", "orders", "table", 1000, {c.name: c for c in COLUMNS})


def q(*params: tuple[str, str]) -> ExportQuery:
    return parse(ORDERS, params)


def refused(*params: tuple[str, str]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(ORDERS, params)
    assert caught.value.status == 400
    return caught.value


# --- parse: what a valid query becomes -------------------------------------------------


def test_no_parameters_mean_every_column_in_catalog_order() -> None:
    query = q()
    assert query.dataset is ORDERS
    assert query.columns == COLUMNS
    assert (query.filters, query.order, query.limit, query.offset) == ([], [], None, None)


@pytest.mark.parametrize(("value", "expected"), [
    ("id", [ID]),
    ("note,id", [NOTE, ID]),
    (" note , id ", [NOTE, ID]),
    ("id,id", [ID, ID]),
    ("limit,~by", [LIMIT, BY]),
])
def test_select(value: str, expected: list[Column]) -> None:
    assert q(("select", value)).columns == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("id", [Order(ID)]),
    ("id.desc", [Order(ID, descending=True)]),
    ("created_at.desc,id", [Order(CREATED, True), Order(ID)]),
    ("note.nullsfirst", [Order(NOTE, nulls="FIRST")]),
    ("note.asc.nullslast", [Order(NOTE, nulls="LAST")]),
    # The last of two contrary modifiers wins, as PostgREST reads them.
    ("id.desc.asc", [Order(ID)]),
    ("id.nullsfirst.nullslast.desc", [Order(ID, True, "LAST")]),
])
def test_order(value: str, expected: list[Order]) -> None:
    assert q(("order", value)).order == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("0", 0), ("10", 10), ("007", 7), (str(MAX_BIGINT), MAX_BIGINT),
    ("0" * 30 + "5", 5),  # leading zeros do not count towards the 19 digits
])
def test_limit_and_offset(value: str, expected: int) -> None:
    query = q(("limit", value), ("offset", value))
    assert (query.limit, query.offset) == (expected, expected)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("id", "eq.5", Filter("id", ID, "eq", ("5",))),
    ("id", "neq.5", Filter("id", ID, "neq", ("5",))),
    ("id", "gte.-1", Filter("id", ID, "gte", ("-1",))),
    ("id", "not.lt.5", Filter("id", ID, "lt", ("5",), negated=True)),
    # Only the first dot separates operator and value.
    ("amount", "gt.10.5", Filter("amount", AMOUNT, "gt", ("10.5",))),
    ("note", "eq.", Filter("note", NOTE, "eq", ("",))),
    ("note", "eq.a.b.c", Filter("note", NOTE, "eq", ("a.b.c",))),
    # `*` is PostgREST's wildcard; `%` stays one too.
    ("note", "like.*Brien%", Filter("note", NOTE, "like", ("%Brien%",))),
    ("note", "ilike.a\\\\", Filter("note", NOTE, "ilike", ("a\\\\",))),
    ("note", "is.null", Filter("note", NOTE, "is", (), is_value="NULL")),
    ("note", "is.not_null", Filter("note", NOTE, "is", (), is_value="NOT NULL")),
    ("paid", "is.true", Filter("paid", PAID, "is", (), is_value="TRUE")),
    ("paid", "not.is.false", Filter("paid", PAID, "is", (), True, "FALSE")),
    ("paid", "is.unknown", Filter("paid", PAID, "is", (), is_value="UNKNOWN")),
    ("id", "in.(3,1,2)", Filter("id", ID, "in", ("3", "1", "2"))),
    ("id", "not.in.(1)", Filter("id", ID, "in", ("1",), negated=True)),
    ("id", "in.()", Filter("id", ID, "in", ())),
    # Unquoted items are trimmed, quoted ones kept as they are, with \ escaping.
    ("note", 'in.( a ,"Smith, John"," b ",c\\"d)', Filter("note", NOTE, "in",
                                                           ("a", "Smith, John", " b ", 'c\\"d'))),
    ("note", 'in.("a\\"b","(x)",)', Filter("note", NOTE, "in", ('a"b', "(x)", ""))),
    # A quoted parameter is always a column: also one named like a reserved parameter.
    ('"limit"', "gte.10", Filter('"limit"', LIMIT, "gte", ("10",))),
    ('"~by"', "eq.me", Filter('"~by"', BY, "eq", ("me",))),
    ('"say ""hi"""', "eq.x", Filter('"say ""hi"""', QUOTED, "eq", ("x",))),
    ('"id"', "eq.1", Filter('"id"', ID, "eq", ("1",))),
])
def test_filters(name: str, value: str, expected: Filter) -> None:
    assert q((name, value)).filters == [expected]


def test_filters_on_the_same_column_add_up_in_order() -> None:
    query = q(("id", "gt.1"), ("limit", "5"), ("id", "lt.9"), ('"limit"', "eq.3"))
    assert query.filters == [Filter("id", ID, "gt", ("1",)), Filter("id", ID, "lt", ("9",)),
                             Filter('"limit"', LIMIT, "eq", ("3",))]
    assert query.limit == 5


# --- parse: what a mistake is told -----------------------------------------------------

QUOTE_HINT = "; to filter the column '{0}', put its name in double quotes: \"{0}\"=eq.VALUE"


@pytest.mark.parametrize(("params", "parameter", "message"), [
    ([("nope", "eq.1")], "nope", "unknown column 'nope' in dataset 'orders'"),
    ([('"nope"', "eq.1")], '"nope"', "unknown column 'nope' in dataset 'orders'"),
    ([("id", "between.1")], "id", "expected operator.value with operator one of"
     " eq, neq, gt, gte, lt, lte, like, ilike, in, is, isdistinct, match, imatch, cs, cd, ov,"
     " fts, plfts, phfts, wfts"),
    ([("id", "gt")], "id", "expected operator.value with operator one of"
     " eq, neq, gt, gte, lt, lte, like, ilike, in, is, isdistinct, match, imatch, cs, cd, ov,"
     " fts, plfts, phfts, wfts"),
    ([("id", "not.")], "id", "expected operator.value with operator one of"
     " eq, neq, gt, gte, lt, lte, like, ilike, in, is, isdistinct, match, imatch, cs, cd, ov,"
     " fts, plfts, phfts, wfts"),
    ([("paid", "is.maybe")], "paid", "'is' takes one of null, not_null, true, false, unknown"),
    ([("note", "is.true")], "note", "'is.true' needs a boolean column"),
    ([("id", "not.is.unknown")], "id", "'is.unknown' needs a boolean column"),
    ([("id", "in.1,2")], "id", "'in' takes a list in parentheses: in.(a,b)"),
    ([("id", 'in.("1,2)')], "id", "unterminated double quote in list"),
    ([("note", "like.abc\\")], "note", "a like pattern may not end with a lone \\"),
    ([("note", "ilike.a\\\\\\")], "note", "a ilike pattern may not end with a lone \\"),
    ([("select", "")], "select", "expected a comma-separated list of columns"),
    ([("select", "id,,note")], "select", "expected a comma-separated list of columns"),
    ([("select", "id,nope")], "select", "unknown column 'nope' in dataset 'orders'"),
    ([("order", "nope.desc")], "order", "unknown column 'nope' in dataset 'orders'"),
    ([("order", "id.sideways")], "order",
     "unknown order modifier 'sideways' (asc, desc, nullsfirst, nullslast)"),
    ([("order", "id,")], "order", "unknown column '' in dataset 'orders'"),
    ([("offset", "-1")], "offset", f"'offset' must be a whole number from 0 to {MAX_BIGINT}"),
    ([("offset", "1.5")], "offset", f"'offset' must be a whole number from 0 to {MAX_BIGINT}"),
    ([("offset", "+1")], "offset", f"'offset' must be a whole number from 0 to {MAX_BIGINT}"),
    ([("offset", "\uff11")], "offset",  # a fullwidth digit: str.isdigit() says yes
     f"'offset' must be a whole number from 0 to {MAX_BIGINT}"),
    ([("offset", str(MAX_BIGINT + 1))], "offset",
     f"'offset' must be a whole number from 0 to {MAX_BIGINT}"),
    ([("offset", "1"), ("offset", "1")], "offset", "'offset' given more than once"),
    # A reserved name that is also a column: the message says how to reach the column.
    ([("limit", "ten")], "limit",
     f"'limit' must be a whole number from 0 to {MAX_BIGINT}" + QUOTE_HINT.format("limit")),
    # ... but not when it is given twice: that is no attempt to filter it.
    ([("limit", "1"), ("limit", "2")], "limit", "'limit' given more than once"),
    ([("~by", "eq.me")], "~by", "'~by' belongs to signed links, and this request is not one"
     + QUOTE_HINT.format("~by")),
    ([("~expires", "1")], "~expires",
     "'~expires' belongs to signed links, and this request is not one"),
    ([('"unterminated', "eq.1")], '"unterminated',
     'a quoted column name is "name", with "" for a quote inside it'),
    ([('"a"b"', "eq.1")], '"a"b"', 'a quoted column name is "name", with "" for a quote inside it'),
    ([('""', "eq.1")], '""', 'a quoted column name is "name", with "" for a quote inside it'),
    ([("note", "eq.nul\x00byte")], "note", "NUL bytes are not allowed"),
    ([("no\x00te", "eq.1")], "note", "NUL bytes are not allowed"),
])
def test_mistakes_name_the_parameter(params: list[tuple[str, str]], parameter: str,
                                     message: str) -> None:
    error = refused(*params)
    assert (error.parameter, error.message) == (parameter, message)
    assert error.body()["error"] == {"status": 400, "message": message, "parameter": parameter}
    assert error.body()["code"] == "PGRST100" and error.body()["message"] == message


def test_the_first_mistake_is_the_one_told() -> None:
    assert refused(("id", "eq.1"), ("nope", "eq.1"), ("select", "")).parameter == "nope"


# --- select_sql: the statement COPY runs --------------------------------------------------

FROM = 'FROM "exports"."orders"'


def select(*params: tuple[str, str]) -> str:
    return sql.select_sql(q(("select", "id"), *params))


def test_the_whole_dataset() -> None:
    assert sql.select_sql(q()) == (
        'SELECT "id", "note", "amount", "paid", "code", "created_at", "limit", "~by",'
        f' "say ""hi""" {FROM}'
    )


@pytest.mark.parametrize(("params", "tail"), [
    ([("id", "eq.5")], "WHERE \"id\" = '5'::bigint"),
    ([("id", "neq.5"), ("id", "lte.50")], "WHERE \"id\" <> '5'::bigint AND \"id\" <= '50'::bigint"),
    ([("id", "not.gt.5")], "WHERE NOT (\"id\" > '5'::bigint)"),
    # Compared as the type without its modifier, as SQL compares `amount = '10.005'`.
    ([("amount", "gte.10.005")], "WHERE \"amount\" >= '10.005'::numeric"),
    ([("code", "eq.abcd")], "WHERE \"code\" = 'abcd'::bpchar"),
    ([("created_at", "lt.2026-01-01T00:00:00Z")],
     "WHERE \"created_at\" < '2026-01-01T00:00:00Z'::timestamp with time zone"),
    ([("id", "in.(3,1)")], "WHERE \"id\" IN ('3'::bigint, '1'::bigint)"),
    ([("id", "not.in.(3)")], "WHERE NOT (\"id\" IN ('3'::bigint))"),
    ([("id", "in.()")], "WHERE false"),
    ([("id", "not.in.()")], "WHERE NOT (false)"),
    # Patterns: on a string column as it is, on any other as its text.
    ([("note", "like.*O'Brien*")], "WHERE \"note\" LIKE '%O''Brien%'"),
    ([("id", "ilike.1*")], "WHERE \"id\"::text ILIKE '1%'"),
    ([("note", "is.null")], 'WHERE "note" IS NULL'),
    ([("note", "not.is.not_null")], 'WHERE NOT ("note" IS NOT NULL)'),
    ([("paid", "is.true")], 'WHERE "paid" IS TRUE'),
    # Values are literals with their quotes doubled: nothing in them is SQL.
    ([("note", "eq.x' OR '1'='1")], "WHERE \"note\" = 'x'' OR ''1''=''1'::text"),
    ([("note", "eq.a\\'b")], "WHERE \"note\" = 'a\\''b'::text"),
    ([('"say ""hi"""', "eq.\"")], "WHERE \"say \"\"hi\"\"\" = '\"'::text"),
    ([('"limit"', "eq.1")], "WHERE \"limit\" = '1'::integer"),
    ([("order", "id.desc,note.nullsfirst,created_at.asc.nullslast")],
     'ORDER BY "id" DESC, "note" ASC NULLS FIRST, "created_at" ASC NULLS LAST'),
    ([("limit", "007"), ("offset", "0")], "LIMIT 7 OFFSET 0"),
    ([("offset", "20")], "OFFSET 20"),
    ([("limit", "1"), ("id", "gt.1"), ("order", "id")],
     "WHERE \"id\" > '1'::bigint ORDER BY \"id\" ASC LIMIT 1"),
])
def test_select_sql(params: list[tuple[str, str]], tail: str) -> None:
    assert select(*params) == f'SELECT "id" {FROM} {tail}'


def test_identifiers_are_always_quoted() -> None:
    odd = Column('a"; DROP TABLE x; --', "text", "text", "S", True)
    dataset = Dataset('s"x', 'n"y', "view", None, {odd.name: odd})
    assert sql.select_sql(parse(dataset, [])) == (
        'SELECT "a""; DROP TABLE x; --" FROM "s""x"."n""y"'
    )


@pytest.mark.parametrize(("value", "literal"), [
    ("", "''"), ("plain", "'plain'"), ("it's", "'it''s'"), ("''", "''''''"),
    ("back\\slash", "'back\\slash'"), ("é\n\t", "'é\n\t'"),
])
def test_quote_literal(value: str, literal: str) -> None:
    assert sql.quote_literal(value) == literal


def test_quote_literal_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        sql.quote_literal("a\x00b")


@pytest.mark.parametrize(("name", "quoted"), [
    ("id", '"id"'), ('a"b', '"a""b"'), ("", '""'), ("Été", '"Été"'),
])
def test_quote_ident(name: str, quoted: str) -> None:
    assert sql.quote_ident(name) == quoted


# --- the value check's statements and their bound values ------------------------------


def values_and_probes(query: ExportQuery) -> tuple[list[sql._Value], list[sql._Probe]]:
    filters = sql._typed_filters(query)
    return [sql._Value(f, v) for f in filters for v in f.values], sql._probes(query, filters)


def test_only_typed_values_are_checked() -> None:
    query = q(("note", "like.x*"), ("note", "is.null"), ("id", "in.()"), ("id", "eq.1"),
              ("amount", "in.(1.5,x)"))
    values, _ = values_and_probes(query)
    assert [(v.filter.parameter, v.text) for v in values] == [
        ("id", "1"), ("amount", "1.5"), ("amount", "x")]


def test_probes_one_per_operator_and_type_and_one_per_order() -> None:
    query = q(("id", "gt.1"), ("id", "gt.2"), ("id", "in.(1)"), ("paid", "eq.true"),
              ("order", "created_at.desc"))
    _, probes = values_and_probes(query)
    assert [(p.parameter, p.problem, p.sql) for p in probes] == [
        ("id", "column 'id' (bigint) cannot be compared with 'gt'",
         "(CAST(NULL AS bigint) > CAST(NULL AS bigint)) IS NULL"),
        ("id", "column 'id' (bigint) cannot be compared with 'in'",
         "(CAST(NULL AS bigint) = CAST(NULL AS bigint)) IS NULL"),
        ("paid", "column 'paid' (boolean) cannot be compared with 'eq'",
         "(CAST(NULL AS boolean) = CAST(NULL AS boolean)) IS NULL"),
        ("order", "column 'created_at' (timestamp with time zone) cannot be ordered",
         "EXISTS (SELECT 1 FROM (SELECT CAST(NULL AS timestamp with time zone) AS x) AS o"
         " ORDER BY x)"),
    ]


def test_a_modified_type_is_compared_with_its_base_type() -> None:
    _, probes = values_and_probes(q(("amount", "eq.1"), ("code", "lt.a")))
    assert [p.sql for p in probes] == [
        "(CAST(NULL AS numeric(12,2)) = CAST(NULL AS numeric)) IS NULL",
        "(CAST(NULL AS character(3)) < CAST(NULL AS bpchar)) IS NULL",
    ]


def test_soft_check_binds_two_arrays_whatever_the_number_of_values() -> None:
    query = q(("id", "in.(" + ",".join(map(str, range(5000))) + ")"), ("amount", "eq.2.5"))
    values, probes = values_and_probes(query)
    statement, params = sql._soft_check(values, probes)
    assert statement == (
        "SELECT c.ord, (pg_input_error_info(c.v, c.t)).message"
        " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS c(v, t, ord)"
        " WHERE (CAST(NULL AS bigint) = CAST(NULL AS bigint)) IS NULL"
        " AND (CAST(NULL AS numeric(12,2)) = CAST(NULL AS numeric)) IS NULL"
        " AND NOT pg_input_is_valid(c.v, c.t) ORDER BY c.ord LIMIT 1"
    )
    texts, types = params
    assert texts == [*map(str, range(5000)), "2.5"]
    assert types == ["bigint"] * 5000 + ["numeric"]


def test_cast_check_binds_one_array_per_type() -> None:
    values, probes = values_and_probes(q(("id", "in.(1,2)"), ("amount", "eq.2.5"),
                                         ("id", "neq.3")))
    statement, params = sql._cast_check(values, probes)
    assert statement == (
        "SELECT sum(n) FROM (SELECT count(CAST(v AS bigint)) AS n FROM unnest($1::text[]) AS v"
        " UNION ALL SELECT count(CAST(v AS numeric)) AS n FROM unnest($2::text[]) AS v) AS casts"
        " WHERE (CAST(NULL AS bigint) = CAST(NULL AS bigint)) IS NULL"
        " AND (CAST(NULL AS numeric(12,2)) = CAST(NULL AS numeric)) IS NULL"
        " AND (CAST(NULL AS bigint) <> CAST(NULL AS bigint)) IS NULL"
    )
    assert params == (["1", "2", "3"], ["2.5"])


def test_cast_check_of_an_order_alone_runs_only_its_probe() -> None:
    values, probes = values_and_probes(q(("order", "note")))
    assert values == []
    assert sql._cast_check(values, probes) == (
        "SELECT true AND EXISTS (SELECT 1 FROM (SELECT CAST(NULL AS text) AS x) AS o"
        " ORDER BY x)", ())
