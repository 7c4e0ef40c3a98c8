"""Unit tests of PostgREST's grammar beyond plain columns and values: select items (`*`,
renames, casts, JSON paths), quoted names, logic trees, the newer operators, and the SQL
each becomes. No server, no database (what PostgreSQL makes of the SQL, and of the casts'
type names, is tests/test_inprocess_postgrest.py's)."""

from __future__ import annotations

import re

import pytest

from exporter.errors import ApiError
from exporter.exports import sql
from exporter.exports.catalog import Column, Dataset
from exporter.exports.query import (
    MAX_CONDITIONS,
    MAX_DEPTH,
    ExportQuery,
    Filter,
    Item,
    Order,
    Step,
    Tree,
    parse,
)


def column(name: str, type_: str, category: str, base_type: str | None = None) -> Column:
    return Column(name, type_, base_type or type_, category, nullable=True)


ID = column("id", "bigint", "N")
NOTE = column("note", "text", "S")
DATA = column("data", "jsonb", "U")
RAW = column("raw", "json", "U")
TAGS = column("tags", "text[]", "A")
SPAN = column("span", "int4range", "R")
DOC = column("doc", "tsvector", "U")
DOTTED = column("ship.date", "date", "D")
COMMA = column("a,b", "text", "S")
ARROW = column("x->y", "text", "S")
OR = column("or", "integer", "N")
COLUMNS = [ID, NOTE, DATA, RAW, TAGS, SPAN, DOC, DOTTED, COMMA, ARROW, OR]
T = Dataset("s", "t", "table", 10, {c.name: c for c in COLUMNS})
FROM = 'FROM "s"."t"'
# Request text that would change the statement if it ever reached SQL unquoted.
HOSTILE = "x'); DROP TABLE t; --"
HINT = "; put a value holding parentheses, braces or commas in double quotes"


def q(*params: tuple[str, str]) -> ExportQuery:
    return parse(T, params)


def refused(*params: tuple[str, str]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(T, params)
    assert caught.value.status == 400
    return caught.value


def where(*params: tuple[str, str]) -> str:
    return sql.select_sql(q(("select", "id"), *params)).split(" WHERE ", 1)[1]


# --- select ------------------------------------------------------------------------------


def test_star_alone_is_every_column_as_it_is() -> None:
    query = q(("select", "*"))
    assert query.columns == COLUMNS and all(i.plain for i in query.items)
    assert sql.select_sql(query) == sql.select_sql(q())


def test_star_with_others() -> None:
    query = q(("select", "id,*,note"))
    assert query.columns == [ID, *COLUMNS, NOTE]


@pytest.mark.parametrize(("value", "items", "names"), [
    ("total:id", [Item(ID, alias="total")], ["total"]),
    ("id::text", [Item(ID, cast="text")], ["id"]),
    ("n:id::numeric(10,2)", [Item(ID, alias="n", cast="numeric(10,2)")], ["n"]),
    ("data->>city", [Item(DATA, (Step("->>", "city"),))], ["city"]),
    ("data->a->0->>b", [Item(DATA, (Step("->", "a"), Step("->", "0"), Step("->>", "b")))],
     ["b"]),
    ("c:data->a::int", [Item(DATA, (Step("->", "a"),), "c", "int")], ["c"]),
    ('"ship.date"', [Item(DOTTED)], ["ship.date"]),
    ('"a,b",id', [Item(COMMA), Item(ID)], ["a,b", "id"]),
    ('"d:x":"ship.date"', [Item(DOTTED, alias="d:x")], ["d:x"]),
    ('data->"a.b"->>"x,y"', [Item(DATA, (Step("->", "a.b"), Step("->>", "x,y")))], ["x,y"]),
    # A column's exact name wins, as before the grammar grew.
    ("x->y", [Item(ARROW)], ["x->y"]),
    ("ship.date", [Item(DOTTED)], ["ship.date"]),
    ("id::double precision[]", [Item(ID, cast="double precision[]")], ["id"]),
])
def test_select_items(value: str, items: list[Item], names: list[str]) -> None:
    query = q(("select", value))
    assert query.items == items
    assert [i.name for i in query.items] == names
    assert query.columns == [i.column for i in items]


def test_select_sql_of_items() -> None:
    query = q(("select", "id,total:id,n:id::numeric(10,2),data->>city,data->a->-1,"
                         '"ship.date"'),
              ("order", "data->>city.desc.nullslast,id"))
    query.types["numeric(10,2)"] = "numeric(10,2)"  # as sql.check_values resolves it
    assert sql.select_sql(query) == (
        'SELECT "id", "id" AS "total", CAST("id" AS numeric(10,2)) AS "n",'
        " (\"data\"->>'city') AS \"city\", (\"data\"->'a'->(-1)) AS \"-1\","
        f' "ship.date" {FROM} ORDER BY ("data"->>\'city\') DESC NULLS LAST, "id" ASC'
    )


def test_a_negative_index_is_a_number() -> None:
    query = q(("select", "data->-1->>0"))
    assert sql.select_sql(query) == f'SELECT ("data"->(-1)->>(0)) AS "0" {FROM}'


def test_a_cast_is_written_as_postgresql_named_it_never_as_the_request_did() -> None:
    query = q(("select", "id::int4"))
    with pytest.raises(KeyError):
        sql.select_sql(query)  # not resolved: never spliced as written
    query.types["int4"] = "integer"
    assert sql.select_sql(query) == f'SELECT CAST("id" AS integer) AS "id" {FROM}'


@pytest.mark.parametrize(("value", "message"), [
    ("*,items(*)", "embedded resources ('items(*)') are not supported: exports read one dataset"),
    ("id,items!inner(id,note)", "embedded resources ('items!inner(id,note)') are not supported:"
     " exports read one dataset"),
    ("x:items(id)", "embedded resources ('x:items(id)') are not supported: exports read one"
     " dataset"),
    ("id.sum()", "aggregates ('id.sum()') are not supported"),
    ("count()", "aggregates ('count()') are not supported"),
    ("...items(id)", "spreads ('...items(id)') are not supported: exports read one dataset"),
    ("nope", "unknown column 'nope' in dataset 't'"),
    ("a:nope", "unknown column 'nope' in dataset 't'"),
    (":id", "an alias is missing before ':'"),
    ("a:*", "'*' cannot be renamed or cast"),
    ("*::text", "'*' cannot be renamed or cast"),
    ("id->a", "'->' needs a json or jsonb column; 'id' is bigint"),
    ("data->", "a JSON key is missing after '->'"),
    ("data->>", "a JSON key is missing after '->>'"),
    ('"id', "unterminated double quote"),
    ('"ship.date"x', "unexpected 'x' after a column in '\"ship.date\"x'"),
    ("id::int;drop table x", "'int;drop table x' is not a type name"),
    ('id::"int"', "'\"int\"' is not a type name"),
    ("id::int)--", f"unbalanced ')'{HINT}"),
    ("id::int(--", f"unbalanced parentheses{HINT}"),
    ("id::int--", "'int--' is not a type name"),
    ("id::int/**/", "'int/**/' is not a type name"),
    ("id::pg_catalog.int4; select 1", "'pg_catalog.int4; select 1' is not a type name"),
    ("id::", "'' is not a type name"),
    ("id::int::text", "'int::text' is not a type name"),
    ("id::" + "i" * 10_000, f"'{'i' * 100}' is not a type name"),
    ("id::numeric(99999)", "'numeric(99999)' is not a type name"),
    ("id,", "expected a comma-separated list of columns"),
    ("data" + "->a" * 10_000, "a JSON path of more than 32 steps"),
])
def test_select_mistakes(value: str, message: str) -> None:
    error = refused(("select", value))
    assert (error.parameter, error.message) == ("select", message)


def test_star_counts_towards_the_columns_postgresql_allows() -> None:
    parse(T, [("select", ",".join(["*"] * (1664 // len(COLUMNS))))])
    error = refused(("select", ",".join(["*"] * (1664 // len(COLUMNS) + 1))))
    assert error.message == "at most 1664 columns may be selected"


# --- filters and order on JSON paths and quoted names ----------------------------------


@pytest.mark.parametrize(("name", "value", "condition"), [
    ("data->>city", "eq.Paris", "(\"data\"->>'city') = 'Paris'::text"),
    ("data->n", "gt.5", "(\"data\"->'n') > '5'::jsonb"),
    ("data->a->>b", "like.*x*", "(\"data\"->'a'->>'b') LIKE '%x%'"),
    ("data->a", "like.*x*", "(\"data\"->'a')::text LIKE '%x%'"),
    ("data->>n", "in.(1,2)", "(\"data\"->>'n') IN ('1'::text, '2'::text)"),
    ('"data"->>"a b"', "is.null", "(\"data\"->>'a b') IS NULL"),
    ("x->y", "eq.1", "\"x->y\" = '1'::text"),  # a column's exact name first
    ('"ship.date"', "gte.2026-01-01", "\"ship.date\" >= '2026-01-01'::date"),
])
def test_filters_on_paths(name: str, value: str, condition: str) -> None:
    assert where((name, value)) == condition


def test_a_path_filter_types_its_values_as_its_arrow_gives() -> None:
    [f] = q(("data->>n", "eq.1")).filters
    assert (f.type, f.base_type, f.category) == ("text", "text", "S")
    [f] = q(("raw->n", "eq.1")).filters
    assert (f.type, f.base_type, f.category) == ("json", "json", "U")
    assert f.path == (Step("->", "n"),)


@pytest.mark.parametrize(("params", "parameter", "message"), [
    ([("note->>a", "eq.1")], "note->>a", "'->' needs a json or jsonb column; 'note' is text"),
    ([("nope->>a", "eq.1")], "nope->>a", "unknown column 'nope' in dataset 't'"),
    ([("data->>a", "paid.1")], "data->>a", "expected operator.value with operator one of eq,"
     " neq, gt, gte, lt, lte, like, ilike, in, is, isdistinct, match, imatch, cs, cd, ov, fts,"
     " plfts, phfts, wfts"),
    ([('"data"->>"a', "eq.1")], '"data"->>"a', "unterminated double quote in '\"data\"->>\"a'"),
    ([("order", "note->>a")], "order", "'->' needs a json or jsonb column; 'note' is text"),
    ([("order", '"ship.date".sideways')], "order",
     "unknown order modifier 'sideways' (asc, desc, nullsfirst, nullslast)"),
])
def test_path_mistakes(params: list[tuple[str, str]], parameter: str, message: str) -> None:
    error = refused(*params)
    assert (error.parameter, error.message) == (parameter, message)


def test_order_by_quoted_names_and_paths() -> None:
    assert q(("order", '"ship.date".desc,"a,b",data->x->>y.nullsfirst')).order == [
        Order(DOTTED, True), Order(COMMA),
        Order(DATA, False, "FIRST", (Step("->", "x"), Step("->>", "y"))),
    ]


# --- logic trees ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "condition"), [
    ("or", "(id.eq.1,note.gt.b)", "(\"id\" = '1'::bigint OR \"note\" > 'b'::text)"),
    ("and", "(id.gte.1,id.lte.9)", "(\"id\" >= '1'::bigint AND \"id\" <= '9'::bigint)"),
    ("not.or", "(id.eq.1,id.eq.2)", "NOT (\"id\" = '1'::bigint OR \"id\" = '2'::bigint)"),
    ("not.and", "(id.eq.1,note.is.null)", "NOT (\"id\" = '1'::bigint AND \"note\" IS NULL)"),
    ("or", "(id.eq.1,and(id.gt.2,id.lt.3))",
     "(\"id\" = '1'::bigint OR (\"id\" > '2'::bigint AND \"id\" < '3'::bigint))"),
    ("or", "(id.eq.1,not.and(id.gt.2,or(note.eq.x,note.not.eq.y)))",
     "(\"id\" = '1'::bigint OR NOT (\"id\" > '2'::bigint AND (\"note\" = 'x'::text OR"
     " NOT (\"note\" = 'y'::text))))"),
    ("or", "(id.not.in.(1,2),note.in.(\"a,b\",\"(c)\"))",
     "(NOT (\"id\" IN ('1'::bigint, '2'::bigint)) OR \"note\" IN ('a,b'::text, '(c)'::text))"),
    # Double quotes keep a value's commas and parentheses, as PostgREST quotes them.
    ("or", '(note.eq."a,b",note.eq."x)(",note.eq."q\\"q",note.like."*)*")',
     "(\"note\" = 'a,b'::text OR \"note\" = 'x)('::text OR \"note\" = 'q\"q'::text"
     " OR \"note\" LIKE '%)%')"),
    ("or", '("ship.date".eq.2026-01-01,"a,b".eq.x,data->>k.eq.v, id.eq.3)',
     "(\"ship.date\" = '2026-01-01'::date OR \"a,b\" = 'x'::text OR (\"data\"->>'k') = 'v'::text"
     " OR \"id\" = '3'::bigint)"),
    ("or", "(tags.cs.{a,b},span.ov.\"[1,5)\")",
     "(\"tags\" @> '{a,b}'::text[] OR \"span\" && '[1,5)'::int4range)"),
    ("or", "(note.eq.it's)", "(\"note\" = 'it''s'::text)"),
    # A column named like a conjunction: a tree when the value is one.
    ("or", "eq.1", "\"or\" = '1'::integer"),
    ("or", "(or.eq.1)", "(\"or\" = '1'::integer)"),
])
def test_trees(name: str, value: str, condition: str) -> None:
    assert where((name, value)) == condition


def test_trees_add_up_with_filters() -> None:
    query = q(("select", "id"), ("id", "gt.0"), ("or", "(id.eq.1,id.eq.2)"),
              ("and", "(note.eq.a)"))
    assert sql.select_sql(query) == (
        f"SELECT \"id\" {FROM} WHERE \"id\" > '0'::bigint AND (\"id\" = '1'::bigint OR"
        " \"id\" = '2'::bigint) AND (\"note\" = 'a'::text)")
    assert query.trees == [
        Tree("or", "OR", False, (Filter("or", ID, "eq", ("1",)), Filter("or", ID, "eq", ("2",)))),
        Tree("and", "AND", False, (Filter("and", NOTE, "eq", ("a",)),)),
    ]
    assert [f.parameter for f in query.all_filters()] == ["id", "or", "or", "and"]


@pytest.mark.parametrize(("value", "message"), [
    ("id.eq.1", "'and' takes conditions in parentheses: and=(a.eq.1,b.gt.2)"),
    ("()", "'and' takes conditions in parentheses: and=(a.eq.1,b.gt.2)"),
    ("(id.eq.1", "'and' takes conditions in parentheses: and=(a.eq.1,b.gt.2)"),
    ("(id.eq.1),(id.eq.2)", f"unbalanced ')'{HINT}"),
    ("(id.eq.1,(id.eq.2)", f"unbalanced parentheses{HINT}"),
    ('(note.eq."x)', "unterminated double quote"),
    ("(id.eq.1,)", "unknown column '' in dataset 't'"),
    ("(nope.eq.1)", "unknown column 'nope' in dataset 't'"),
    ("(id)", "expected column.operator.value, not 'id'"),
    ("(id.between.1)", "expected operator.value with operator one of eq, neq, gt, gte, lt, lte,"
     " like, ilike, in, is, isdistinct, match, imatch, cs, cd, ov, fts, plfts, phfts, wfts"),
    ('(span.sl."[1,2)")', "unsupported operator 'sl'"),
    ("(span.adj.{1})", "unsupported operator 'adj'"),
    ("(id.eq.1,xor(id.eq.2))", "unknown column 'xor' in dataset 't'"),
    ("(" + "and(" * 5000 + "id.eq.1" + ")" * 5001, f"nested more than {MAX_DEPTH} deep"),
    ("(" + ",".join(["id.eq.1"] * (MAX_CONDITIONS + 1)) + ")",
     f"more than {MAX_CONDITIONS} conditions"),
    ("(" + ",".join(["and(id.eq.1,id.eq.2)"] * 400) + ")",
     f"more than {MAX_CONDITIONS} conditions"),
])
def test_tree_mistakes(value: str, message: str) -> None:
    error = refused(("and", value))
    assert (error.parameter, error.message) == ("and", message)


def test_a_megabyte_tree_is_a_400_in_one_pass() -> None:
    value = "(" + ",".join(["id.eq.1"] * 130_000) + ")"
    assert len(value) > 1_000_000
    assert refused(("not.and", value)).parameter == "not.and"
    # Unbalanced and deep at once: refused on the depth, not on recursion.
    assert refused(("or", "(" * 1_000_000 + ")")).message == f"nested more than {MAX_DEPTH} deep"


def test_deepest_tree_allowed_renders() -> None:
    depth = MAX_DEPTH - 1  # the tree's own parentheses count
    value = "(" + "and(" * (depth - 1) + "id.eq.1" + ")" * depth
    assert where(("or", value)).count("(") == depth + 0


# --- the newer operators ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "condition"), [
    ("id", "isdistinct.1", "\"id\" IS DISTINCT FROM '1'::bigint"),
    ("id", "not.isdistinct.1", "NOT (\"id\" IS DISTINCT FROM '1'::bigint)"),
    ("note", "match.^a.*b$", "\"note\" ~ '^a.*b$'"),
    ("id", "imatch.^1", "\"id\"::text ~* '^1'"),
    ("tags", "cs.{a,\"b c\"}", "\"tags\" @> '{a,\"b c\"}'::text[]"),
    ("tags", "cd.{a}", "\"tags\" <@ '{a}'::text[]"),
    ("span", "ov.[1,5)", "\"span\" && '[1,5)'::int4range"),
    ("span", "cs.3", "\"span\" @> '3'::int4range"),
    ("data", "cs.{\"a\":1}", "\"data\" @> '{\"a\":1}'::jsonb"),
    ("doc", "fts.cat & dog", "\"doc\" @@ to_tsquery('cat & dog')"),
    ("doc", "fts(english).cats", "\"doc\" @@ to_tsquery('english'::regconfig, 'cats')"),
    ("note", "plfts(french).le chat", "to_tsvector('french'::regconfig, \"note\") @@"
     " plainto_tsquery('french'::regconfig, 'le chat')"),
    ("note", "phfts.a b", "to_tsvector(\"note\") @@ phraseto_tsquery('a b')"),
    ("data", "wfts.\"a b\" -c", "to_tsvector(\"data\") @@ websearch_to_tsquery('\"a b\" -c')"),
    ("id", "wfts.1", "to_tsvector(\"id\"::text) @@ websearch_to_tsquery('1')"),
    ("doc", "fts(x'; drop table t; --).a",
     "\"doc\" @@ to_tsquery('x''; drop table t; --'::regconfig, 'a')"),
    ("id", "eq(any).{1,2}", "\"id\" = ANY (ARRAY['1'::bigint, '2'::bigint])"),
    ("id", "not.gt(all).{1,\"2\"}", "NOT (\"id\" > ALL (ARRAY['1'::bigint, '2'::bigint]))"),
    ("note", "like(any).{a*,\"*,*\"}", "\"note\" LIKE ANY (ARRAY['a%', '%,%'])"),
    ("note", "ilike(all).{*a*,*b*}", "\"note\" ILIKE ALL (ARRAY['%a%', '%b%'])"),
    ("note", "match(any).{^a,b$}", "\"note\" ~ ANY (ARRAY['^a', 'b$'])"),
    ("id", "eq(any).{}", "false"),
    ("id", "eq(all).{}", "true"),
    ("data->>k", "neq(any).{x}", "(\"data\"->>'k') <> ANY (ARRAY['x'::text])"),
])
def test_new_operators(name: str, value: str, condition: str) -> None:
    assert where((name, value)) == condition


@pytest.mark.parametrize(("name", "value", "message"), [
    ("span", "sl.[1,2)", "unsupported operator 'sl'"),
    ("span", "not.sr.[1,2)", "unsupported operator 'sr'"),
    ("span", "nxr.[1,2)", "unsupported operator 'nxr'"),
    ("span", "nxl.[1,2)", "unsupported operator 'nxl'"),
    ("span", "adj.[1,2)", "unsupported operator 'adj'"),
    ("id", "eq(some).{1}", "'eq' takes no '(some)'; it takes (any) or (all)"),
    ("id", "in(any).{1}", "'in' takes no '(any)'"),
    ("id", "isdistinct(any).{1}", "'isdistinct' takes no '(any)'"),
    ("doc", "fts().a", "'fts' takes no '()'"),
    ("id", "eq(any).1,2", "'eq(any)' takes a list in braces: eq(any).{a,b}"),
    ("note", "like(all).{a\\\\\\}", "a like pattern may not end with a lone \\"),
    ("note", "like(any).{\"a\\\\\"}", "a like pattern may not end with a lone \\"),
    ("id", "eq(any).{\"1}", "unterminated double quote in list"),
])
def test_operator_mistakes(name: str, value: str, message: str) -> None:
    error = refused((name, value))
    assert (error.parameter, error.message) == (name, message)


LITERAL = re.compile(r"'(?:[^']|'')*'")


@pytest.mark.parametrize("value", [
    f"match.{HOSTILE}", f"imatch(all).{{{HOSTILE}}}", f"fts.{HOSTILE}",
    f"fts({HOSTILE.replace(')', '')}).{HOSTILE}", f"like(any).{{\"{HOSTILE}\"}}",
    f"cs.{HOSTILE}", f"isdistinct.{HOSTILE}", f"eq(all).{{{HOSTILE}}}",
])
def test_operands_are_literals_whatever_they_hold(value: str) -> None:
    rendered = where(("note", value))
    skeleton = LITERAL.sub("?", rendered)
    assert "DROP" not in skeleton and "?" in skeleton, rendered
    # In a tree, quoted as PostgREST quotes a value with parentheses.
    op, _, operand = value.partition(".")
    rendered = where(("or", f'(note.{op}."{operand.replace(chr(34), chr(92) + chr(34))}")'))
    assert "DROP" not in LITERAL.sub("?", rendered), rendered
