"""The query string of an export, in PostgREST's grammar, parsed into an ExportQuery.

The grammar, and why: docs/internals.md, section `exports/query.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from exporter.access.links import LINK_PARAMETERS
from exporter.errors import ApiError, bad_parameter
from exporter.exports.catalog import Column, Dataset
from exporter.exports.cursor import Cursor
from exporter.exports.operators import (
    BOOLEAN_KEYWORDS,
    BY_NAME,
    NAMES,
    UNSUPPORTED,
    Operand,
)

# Parameters that are not filters unless quoted: the query's own, and a signed link's
# (which the route takes out of a link's query before parsing; elsewhere they are a 400).
QUERY_PARAMETERS = ("select", "order", "limit", "offset", "since")
RESERVED = {*QUERY_PARAMETERS, *LINK_PARAMETERS}
MAX_BIGINT = 2**63 - 1
# PostgreSQL refuses a SELECT of more columns ("target lists can have at most 1664
# entries"): a longer `select` is the client's mistake, not the database's failure.
MAX_SELECT = 1664
# Logic trees: `or=(...)` and its like, as (conjunction, negated).
LOGIC = {"or": ("OR", False), "and": ("AND", False),
         "not.or": ("OR", True), "not.and": ("AND", True)}
# Bounds on a logic tree, so that a hostile one costs a 400, not a RecursionError or a
# statement PostgreSQL takes minutes to plan. Parentheses and braces of lists count
# towards the depth.
MAX_DEPTH = 32
MAX_CONDITIONS = 1000
# Steps of one JSON path: each is an operator PostgreSQL's parser recurses into, and
# thousands exhaust its stack (a 500, not the client's 400).
MAX_PATH = 32
# A cast's type: words (`double precision`), perhaps schema-qualified, a modifier of
# numbers and array brackets. Nothing else can reach PostgreSQL's type lookup, and only
# the name PostgreSQL gives back for the words is ever written into SQL.
_TYPE = re.compile(
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:[ .][A-Za-z_][A-Za-z0-9_]*){0,3})"
    r"(?P<modifier>\(\d{1,4}(?:,\d{1,4})?\))?(?P<array>(?:\[\]){0,6})"
)
MAX_TYPE = 100
# `op.`, `op(any).`, `fts(english).`: an operator name and what it takes in parentheses.
_OPERATOR = re.compile(r"([a-z]+)(?:\(([^()]*)\))?\.", re.S)
# A JSON path step that is an array index rather than a key, as PostgREST reads `->0`.
INDEX = re.compile(r"-?\d{1,9}")
# A select item that is PostgREST's embedding (`items(*)`, `items!inner(id)`) or an
# aggregate (`amount.sum()`, `count()`).
_AGGREGATE = re.compile(r"(?:.*\.)?(?:sum|avg|min|max|count)\(\)(?:::.*)?", re.S)


@dataclass(frozen=True)
class Step:
    """One step of a JSON path: `->` keeps json, `->>` gives text."""

    arrow: str
    key: str  # a key, or an array index (INDEX)


def path_types(column: Column, path: tuple[Step, ...]) -> tuple[str, str, str]:
    """(type, base type, category) of a column followed along a JSON path."""
    if not path:
        return column.type, column.base_type, column.category
    if path[-1].arrow == "->>":
        return "text", "text", "S"
    return column.base_type, column.base_type, "U"


@dataclass(frozen=True)
class Filter:
    parameter: str
    column: Column
    operator: str
    values: tuple[str, ...]  # one value, or a LIST operand's; empty for a KEYWORD
    negated: bool = False
    is_value: str | None = None  # a KEYWORD operand, as SQL
    path: tuple[Step, ...] = ()  # `data->>name=eq.x`
    quantifier: str | None = None  # "ANY" | "ALL": `eq(any).{1,2}`
    language: str | None = None  # `fts(english).word`: a regconfig, checked by PostgreSQL

    @property
    def type(self) -> str:
        return path_types(self.column, self.path)[0]

    @property
    def base_type(self) -> str:
        return path_types(self.column, self.path)[1]

    @property
    def category(self) -> str:
        return path_types(self.column, self.path)[2]


@dataclass(frozen=True)
class Tree:
    """`or=(a.eq.1,and(b.gt.2,c.lt.3))`: conditions joined by one conjunction."""

    parameter: str  # as given: "or", "not.and"
    conjunction: str  # "AND" | "OR"
    negated: bool
    children: tuple[Filter | Tree, ...]


@dataclass(frozen=True)
class Order:
    column: Column
    descending: bool = False
    nulls: str | None = None  # "FIRST" | "LAST"
    path: tuple[Step, ...] = ()

    @property
    def type(self) -> str:
        return path_types(self.column, self.path)[0]


@dataclass(frozen=True)
class Item:
    """One output column of `select`: a column, perhaps along a JSON path, perhaps cast,
    perhaps renamed."""

    column: Column
    path: tuple[Step, ...] = ()
    alias: str | None = None
    cast: str | None = None  # the type as the request wrote it; sql.check_values resolves it

    @property
    def name(self) -> str:
        """The output name, as PostgREST gives it: the alias, else the last JSON key,
        else the column's name."""
        if self.alias is not None:
            return self.alias
        return self.path[-1].key if self.path else self.column.name

    @property
    def plain(self) -> bool:
        return not self.path and self.alias is None and self.cast is None


@dataclass(frozen=True)
class ResultColumn:
    """One column of the export's result: its name, and the type PostgreSQL gives its
    values (format_type's spelling; a cast's own modifier included)."""

    name: str
    type: str


@dataclass
class ExportQuery:
    dataset: Dataset
    columns: list[Column]  # the column each output column comes from
    filters: list[Filter] = field(default_factory=list)
    order: list[Order] = field(default_factory=list)
    limit: int | None = None
    offset: int | None = None
    # What `select` asked for, one per output column; empty: `columns`, as they are.
    items: list[Item] = field(default_factory=list)
    trees: list[Tree] = field(default_factory=list)
    # A cast's type as written -> as PostgreSQL named it (sql.check_values fills it).
    types: dict[str, str] = field(default_factory=dict)

    # `since` as given; the service checks it and sets `changed_since` (cursor.py).
    since: str | None = None
    changed_since: Cursor | None = None
    # The xid the export transaction's age() counts from, once read (cursor.py).
    since_reference: int | None = None
    # Every value as text, with a quote before one a spreadsheet would run as a formula:
    # the audit trail's CSV, whose cells hold what clients sent (paths, ranges, names).
    formula_safe: bool = False

    @property
    def partial(self) -> bool:
        """Whether `limit`/`offset` (or a page of items) leave out rows of the snapshot:
        such an export gets no change cursor, which would claim the rows it left out."""
        return self.limit is not None or bool(self.offset)

    def result_columns(self) -> list[ResultColumn]:
        """The result's columns, in order (a cast's type once check_values resolved it)."""
        if not self.items:
            # The column's own type where it is its base type with a modifier
            # (numeric(12,2)): a domain's is its base type's name.
            return [ResultColumn(c.name, c.type if c.type.partition("(")[0] == c.base_type
                                 else c.base_type) for c in self.columns]
        return [ResultColumn(i.name, self.types.get(i.cast, i.cast) if i.cast is not None
                       else path_types(i.column, i.path)[1]) for i in self.items]

    def all_filters(self) -> list[Filter]:
        """The filters, those inside logic trees included."""
        found = list(self.filters)
        stack: list[Filter | Tree] = list(reversed(self.trees))
        while stack:
            node = stack.pop()
            if isinstance(node, Tree):
                stack.extend(reversed(node.children))
            else:
                found.append(node)
        return found


def parse(dataset: Dataset, params: Iterable[tuple[str, str]]) -> ExportQuery:
    query = ExportQuery(dataset, list(dataset.columns.values()))
    seen: set[str] = set()
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            raise bad_parameter(name.replace("\x00", ""), "NUL bytes are not allowed")
        if name in LOGIC and (value.startswith("(") or name not in dataset.columns):
            conjunction, negated = LOGIC[name]
            query.trees.append(_parse_tree(dataset, name, conjunction, negated, value, [0]))
            continue
        if name.startswith('"'):
            column, path = _filter_field(dataset, name)
            query.filters.append(_parse_filter(dataset, name, column, path, value))
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
            column, path = _filter_field(dataset, name)
            query.filters.append(_parse_filter(dataset, name, column, path, value))
    return query


def _parse_reserved(query: ExportQuery, name: str, value: str) -> None:
    if name == "select":
        query.items = _parse_select(query.dataset, value)
        query.columns = [item.column for item in query.items]
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


# --- names and JSON paths ------------------------------------------------------------


def _read_name(parameter: str, text: str, i: int, stops: str) -> tuple[str, int]:
    """The name at text[i:]: in double quotes (`""` for a quote), or bare up to one of
    `stops` or an arrow. Returns it and where it ends."""
    if text.startswith('"', i):
        parts, j = [], i + 1
        while True:
            k = text.find('"', j)
            if k < 0:
                raise bad_parameter(parameter, f"unterminated double quote in {text!r}")
            parts.append(text[j:k])
            if not text.startswith('"', k + 1):
                return "".join(parts), k + 1
            parts.append('"')
            j = k + 2
    j = i
    while j < len(text) and text[j] not in stops and not text.startswith("->", j):
        j += 1
    return text[i:j], j


def _read_field(dataset: Dataset, parameter: str, text: str, i: int,
                stops: str) -> tuple[Column, tuple[Step, ...], int]:
    """`name`, `"name"`, `name->key->>key`, `name->0` at text[i:]."""
    name, j = _read_name(parameter, text, i, stops)
    column = _column(dataset, parameter, name)
    path: list[Step] = []
    while text.startswith("->", j):
        arrow = "->>" if text.startswith("->>", j) else "->"
        key, j = _read_name(parameter, text, j + len(arrow), stops)
        if not key:
            raise bad_parameter(parameter, f"a JSON key is missing after '{arrow}'")
        path.append(Step(arrow, key))
        if len(path) > MAX_PATH:
            raise bad_parameter(parameter, f"a JSON path of more than {MAX_PATH} steps")
    if path and column.base_type not in ("json", "jsonb"):
        raise bad_parameter(parameter, f"'->' needs a json or jsonb column; '{column.name}'"
                            f" is {column.type}")
    return column, tuple(path), j


def _filter_field(dataset: Dataset, name: str) -> tuple[Column, tuple[Step, ...]]:
    """The column (and JSON path) a filter's parameter names: a column's exact name
    first, as before paths existed."""
    if name.startswith('"'):
        try:
            return _column(dataset, name, _unquote(name)), ()
        except ApiError:
            if "->" not in name:
                raise
    elif name in dataset.columns or "->" not in name:
        return _column(dataset, name, name), ()
    column, path, end = _read_field(dataset, name, name, 0, "")
    if end != len(name):
        raise bad_parameter(name, 'a quoted column name is "name", with "" for a quote'
                            " inside it")
    return column, path


# PostgREST's way to write a range or a value holding `(),` inside a tree: `span.ov."[1,5)"`.
_QUOTE_HINT = "; put a value holding parentheses, braces or commas in double quotes"


def _split(parameter: str, text: str, limit: int | None = None,
           what: str = "items") -> list[str]:
    """`text` cut at its commas outside double quotes, parentheses and braces, in one pass
    (a hostile text costs its length, once)."""
    parts: list[str] = []
    depth, start, quoted, i, n = 0, 0, False, 0, len(text)
    while i < n:
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in "({":
            depth += 1
            if depth > MAX_DEPTH:
                raise bad_parameter(parameter, f"nested more than {MAX_DEPTH} deep")
        elif ch in ")}":
            depth -= 1
            if depth < 0:
                raise bad_parameter(parameter, f"unbalanced '{ch}'{_QUOTE_HINT}")
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
            if limit is not None and len(parts) > limit:
                raise bad_parameter(parameter, f"more than {limit} {what}")
        i += 1
    if quoted:
        raise bad_parameter(parameter, "unterminated double quote")
    if depth:
        raise bad_parameter(parameter, f"unbalanced parentheses{_QUOTE_HINT}")
    parts.append(text[start:])
    return parts


# --- select and order ----------------------------------------------------------------


def _parse_select(dataset: Dataset, value: str) -> list[Item]:
    texts = [t.strip() for t in _split("select", value)]
    if not value.strip() or any(not t for t in texts):
        raise bad_parameter("select", "expected a comma-separated list of columns")
    items: list[Item] = []
    for text in texts:
        if text == "*":
            items.extend(Item(c) for c in dataset.columns.values())
        elif text in dataset.columns:  # any name, as before the grammar grew
            items.append(Item(dataset.columns[text]))
        else:
            items.append(_parse_item(dataset, text))
        if len(items) > MAX_SELECT:
            raise bad_parameter("select", f"at most {MAX_SELECT} columns may be selected")
    return items


def _parse_item(dataset: Dataset, text: str) -> Item:
    """`[alias:]column[->key...][::type]`."""
    if text.startswith("..."):
        raise bad_parameter("select", f"spreads ('{text}') are not supported: exports read"
                            " one dataset")
    if _AGGREGATE.fullmatch(text):
        raise bad_parameter("select", f"aggregates ('{text}') are not supported")
    if re.match(r'[^"]*\(', text.split("::", 1)[0]):  # a cast's `numeric(10,2)` is not one
        raise bad_parameter("select", f"embedded resources ('{text}') are not supported:"
                            " exports read one dataset")
    alias = None
    name, i = _read_name("select", text, 0, ":")
    if text.startswith(":", i) and not text.startswith("::", i):
        alias, text = name, text[i + 1:]
        if not alias:
            raise bad_parameter("select", "an alias is missing before ':'")
    if text == "*" or text.startswith("*::"):
        raise bad_parameter("select", "'*' cannot be renamed or cast")
    column, path, i = _read_field(dataset, "select", text, 0, ":")
    cast = None
    if text.startswith("::", i):
        cast, i = text[i + 2:].strip(), len(text)
        if len(cast) > MAX_TYPE or not _TYPE.fullmatch(cast):
            raise bad_parameter("select", f"'{cast[:MAX_TYPE]}' is not a type name")
    if i != len(text):
        raise bad_parameter("select", f"unexpected {text[i:]!r} after a column in '{text}'")
    return Item(column, path, alias, cast)


def cast_type(cast: str) -> tuple[str, str, str]:
    """A cast as written, cut into (type name for PostgreSQL's lookup, modifier, array
    brackets); parse() let only _TYPE through."""
    match = _TYPE.fullmatch(cast)
    assert match is not None
    return match["name"], match["modifier"] or "", match["array"]


def _parse_order(dataset: Dataset, value: str) -> list[Order]:
    orders = []
    for term in _split("order", value):
        term = term.strip()
        column, path, i = _read_field(dataset, "order", term, 0, ".")
        descending, nulls = False, None
        for modifier in term[i + 1:].split(".") if i < len(term) else ():
            if modifier in ("asc", "desc"):
                descending = modifier == "desc"
            elif modifier in ("nullsfirst", "nullslast"):
                nulls = modifier[5:].upper()
            else:
                raise bad_parameter(
                    "order",
                    f"unknown order modifier '{modifier}' (asc, desc, nullsfirst, nullslast)",
                )
        orders.append(Order(column, descending, nulls, path))
    return orders


def _parse_count(name: str, value: str) -> int:
    # The length first: int() refuses more than 4300 digits with a ValueError.
    if (not value.isascii() or not value.isdigit() or len(value.lstrip("0")) > 19
            or int(value) > MAX_BIGINT):
        raise bad_parameter(name, f"'{name}' must be a whole number from 0 to {MAX_BIGINT}")
    return int(value)


# --- filters and logic trees ---------------------------------------------------------


def _parse_tree(dataset: Dataset, parameter: str, conjunction: str, negated: bool,
                text: str, count: list[int]) -> Tree:
    """`(cond,cond,and(...),not.or(...))`; `count` holds the conditions seen so far."""
    if not (text.startswith("(") and text.endswith(")")) or len(text) < 3:
        raise bad_parameter(parameter, f"'{parameter}' takes conditions in parentheses:"
                            f" {parameter}=(a.eq.1,b.gt.2)")
    children: list[Filter | Tree] = []
    for item in _split(parameter, text[1:-1], MAX_CONDITIONS, "conditions"):
        item = item.lstrip(" ")
        count[0] += 1
        if count[0] > MAX_CONDITIONS:
            raise bad_parameter(parameter, f"more than {MAX_CONDITIONS} conditions")
        nested = re.match(r"(not\.)?(and|or)\(", item)
        if nested and item.endswith(")"):
            children.append(_parse_tree(
                dataset, parameter, nested[2].upper(), bool(nested[1]),
                item[nested.end() - 1:], count))
            continue
        column, path, i = _read_field(dataset, parameter, item, 0, ".,()")
        if not item.startswith(".", i):
            raise bad_parameter(parameter, f"expected column.operator.value, not {item!r}")
        children.append(_parse_filter(dataset, parameter, column, path, item[i + 1:],
                                      in_tree=True))
    return Tree(parameter, conjunction, negated, tuple(children))


def _unknown_operator(parameter: str, value: str) -> ApiError:
    name = re.match(r"[a-z]*", value)
    if name and name[0] in UNSUPPORTED:
        return bad_parameter(parameter, f"unsupported operator '{name[0]}'")
    return bad_parameter(
        parameter, f"expected operator.value with operator one of {', '.join(NAMES)}"
    )


def _parse_filter(dataset: Dataset, name: str, column: Column, path: tuple[Step, ...],
                  value: str, in_tree: bool = False) -> Filter:
    """`name` is the parameter as given, `column` and `path` what it names."""
    negated = value.startswith("not.")
    if negated:
        value = value[4:]
    match = _OPERATOR.match(value)
    operator = BY_NAME.get(match[1]) if match else None
    if match is None or operator is None:
        raise _unknown_operator(name, value)
    modifier, operand = match[2], value[match.end():]
    category = path_types(column, path)[2]
    base = Filter(name, column, operator.name, (), negated, path=path)
    if in_tree and operand.startswith('"') and operand.endswith('"') and len(operand) > 1:
        # PostgREST's quoting of a value holding commas or parentheses inside a tree.
        operand = re.sub(r"\\(.)", r"\1", operand[1:-1], flags=re.S)
    if modifier is not None:
        if operator.quantified and modifier in ("any", "all"):
            values = _parse_braces(name, operand, f"{operator.name}({modifier})")
            if operator.operand is Operand.PATTERN:
                values = [_pattern(name, operator.name, v) for v in values]
            return _with(base, tuple(values), quantifier=modifier.upper())
        if operator.operand is Operand.TSQUERY and modifier:
            return _with(base, (operand,), language=modifier)
        raise bad_parameter(name, f"'{operator.name}' takes no '({modifier})'" + (
            "; it takes (any) or (all)" if operator.quantified else ""))
    if operator.operand is Operand.KEYWORD:
        keywords = dict(operator.keywords)
        if operand not in keywords:
            raise bad_parameter(name, f"'{operator.name}' takes one of {', '.join(keywords)}")
        if operand in BOOLEAN_KEYWORDS and category != "B":
            raise bad_parameter(name, f"'{operator.name}.{operand}' needs a boolean column")
        return _with(base, (), is_value=keywords[operand])
    if operator.operand is Operand.LIST:
        return _with(base, tuple(_parse_list(name, operand)))
    if operator.operand is Operand.PATTERN:
        operand = _pattern(name, operator.name, operand)
    return _with(base, (operand,))


def _with(base: Filter, values: tuple[str, ...], **changes: str | None) -> Filter:
    return Filter(base.parameter, base.column, base.operator, values, base.negated,
                  changes.get("is_value"), base.path, changes.get("quantifier"),
                  changes.get("language"))


def _pattern(parameter: str, operator: str, operand: str) -> str:
    # PostgREST spells the % wildcard as *, which needs no URL encoding.
    operand = operand.replace("*", "%")
    # PostgreSQL fails on such a pattern only once a row matches up to its end,
    # perhaps mid-download: refuse it before.
    if (len(operand) - len(operand.rstrip("\\"))) % 2:
        raise bad_parameter(parameter, f"a {operator} pattern may not end with a lone \\")
    return operand


def _parse_braces(parameter: str, text: str, what: str) -> list[str]:
    """`{a,b,"c,d"}`: the values of `op(any)` and `op(all)`, in PostgreSQL's array syntax
    as PostgREST takes it."""
    if not (text.startswith("{") and text.endswith("}")):
        raise bad_parameter(parameter, f"'{what}' takes a list in braces: {what}.{{a,b}}")
    return _items(parameter, text[1:-1])


def _parse_list(parameter: str, text: str) -> list[str]:
    """`(a,b,"c,d")`: PostgREST's list, where double quotes keep commas and parentheses."""
    if not (text.startswith("(") and text.endswith(")")):
        raise bad_parameter(parameter, "'in' takes a list in parentheses: in.(a,b)")
    return _items(parameter, text[1:-1])


def _items(parameter: str, body: str) -> list[str]:
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
