"""The package's layering, read from the source with `ast` (nothing is imported).

core <- access <- {exports, files} <- stored <- web <- app, cli: the core (every module
outside a feature package but app.py and cli.py) imports no feature; access imports only
the core; exports and files import the core and access, never each other; stored (stored
exports) imports those; web anything but app and cli. And no import cycle at all,
counting the imports made inside functions (which run too), not those under
`if TYPE_CHECKING:` (which never run).
"""

from __future__ import annotations

import ast
import configparser
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
# The top-level migrations/ of the checkout, which the wheel carries as exporter.migrations.
MIGRATIONS = PACKAGE.parent / "migrations"
FEATURES = ("access", "exports", "files", "stored", "web")
TOP = ("exporter.app", "exporter.cli")

# Imports that break the rules, each with why and who removes it. None today: keep it so.
KNOWN: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    if path.is_relative_to(MIGRATIONS):
        parts = ("exporter", *path.relative_to(PACKAGE.parent).with_suffix("").parts)
    else:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(
    [*PACKAGE.rglob("*.py"), *MIGRATIONS.rglob("*.py")])}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: functions' included, TYPE_CHECKING's not."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            # An `else:` of TYPE_CHECKING does run.
            found += _runtime_imports(ast.Module(body=child.orelse, type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            found.append(child)
        else:
            found += _runtime_imports(child)
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str) -> set[str]:
    """The modules of `exporter` that module `name` imports at run time."""
    path = MODULES[name]
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name in MODULES)
            continue
        base = node.module or ""
        if node.level:  # relative: from the package of this module, up level - 1
            package = _package_of(name, path).split(".")
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        if not base.startswith("exporter"):
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in MODULES else base)
    targets.discard(name)
    return {t for t in targets if t in MODULES}


GRAPH: dict[str, set[str]] = {name: imports(name) for name in MODULES}


def layer(name: str) -> str:
    """`core`, a feature's name, or `top` (app and cli)."""
    if name in TOP:
        return "top"
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in FEATURES:
        return parts[1]
    return "core"


ALLOWED = {
    "core": {"core"},
    "access": {"core", "access"},
    "exports": {"core", "access", "exports"},
    "files": {"core", "access", "files"},
    "stored": {"core", "access", "exports", "files", "stored"},
    "web": {"core", "access", "exports", "files", "stored", "web"},
    "top": {"core", "access", "exports", "files", "stored", "web", "top"},
}


def test_the_graph_is_read() -> None:
    # A parser that found nothing would pass every rule below.
    assert "exporter.tables" in GRAPH["exporter.migrations.env"]
    assert "exporter.exports.renderers" in GRAPH["exporter.exports.export"]
    assert "exporter.state" in GRAPH["exporter.app"]
    assert "exporter.db" in GRAPH["exporter.clikit"], "function-level imports count"
    assert "exporter.access.limits" not in GRAPH["exporter.state"], "TYPE_CHECKING does not"


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down(name: str) -> None:
    allowed = ALLOWED[layer(name)]
    wrong = sorted(t for t in GRAPH[name]
                   if layer(t) not in allowed and (name, t) not in KNOWN)
    assert not wrong, f"{name} ({layer(name)}) may not import {wrong}"


def test_route_modules_do_not_import_each_other() -> None:
    routes = {n for n in MODULES if n.rpartition(".")[2] in ("routes", "downloads", "page")
              or n == "exporter.health"}
    # health.py holds a route too, beside its probe; app.py puts the routers together.
    for name in routes:
        assert not GRAPH[name] & routes, f"{name} imports {sorted(GRAPH[name] & routes)}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = {n: {t for t in targets if (n, t) not in KNOWN} for n, targets in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_known_exceptions_still_exist() -> None:
    # Once an edge is gone, its exception goes too, so that it cannot come back unseen.
    for source, target in KNOWN:
        assert target in GRAPH[source], f"{source} no longer imports {target}: drop it"


@pytest.mark.parametrize("feature", [*FEATURES, "server"])
def test_each_package_says_what_it_owns(feature: str) -> None:
    init = PACKAGE / feature / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring) > 40, f"{init} needs a docstring: what it owns, imports"


# --- the migrations: a top-level folder, a package of the wheel -----------------------------

def test_the_wheel_maps_the_top_level_migrations_into_the_package() -> None:
    """pyproject.toml lists the packages (a mapped package cannot be found by setuptools'
    discovery): every package folder under exporter/, and the migrations under their
    wheel name. A new package folder that is not listed would be missing from wheels."""
    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"][
        "setuptools"]
    assert setuptools["package-dir"] == {"exporter.migrations": "migrations"}
    folders = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert "exporter.exports.renderers" in folders
    assert sorted(setuptools["packages"]) == sorted(
        [*folders, "exporter.migrations", "exporter.migrations.versions"])
    assert not (PACKAGE / "migrations" / "env.py").exists(), "one home for the migrations"
    assert (MIGRATIONS / "env.py").is_file() and list((MIGRATIONS / "versions").glob("0*.py"))


def test_a_checkout_migrates_from_the_top_level_folder() -> None:
    """alembic.ini and `exporter migrate` run from a checkout both use migrations/ (the
    installed wheel's exporter/migrations is tests/test_packaging.py's)."""
    from exporter import clikit

    assert clikit.MIGRATIONS == MIGRATIONS
    ini = configparser.ConfigParser()
    ini.read(PACKAGE.parent / "alembic.ini")
    location = ini.get("alembic", "script_location", raw=True)
    assert Path(location.replace("%(here)s", str(PACKAGE.parent))) == MIGRATIONS


# --- one rule about HTTP: services take plain values, and only routes see State whole -------

HTTP_LIBRARIES = ("fastapi", "starlette")
# The modules of a feature that speak HTTP: routes (`downloads` and `page` hold routes
# too), what routes take as parameters (`deps`), the one module that makes a feature's
# answers into responses, OpenAPI declarations, authentication (it reads the request's
# credentials), and limits.py's middleware (it holds a lease while a response is sent).
# Every other module of a feature is domain code.
HTTP_MODULES = {"routes", "downloads", "page", "deps", "response", "responses", "openapi",
                "authenticate", "limits"}
DOMAIN_FEATURES = ("access", "exports", "files", "stored")  # web is all HTTP
# The only modules that see State whole: the app and the state, what routes take, the
# routes (health.py holds one beside its probe).
STATE_MODULES = {"exporter.app", "exporter.state", "exporter.health"}
STATE_TYPES = {"State", "StateDep"}


def _all_imports(name: str) -> set[str]:
    """Every module `name` imports, outside the package too, TYPE_CHECKING's included
    (a type in a signature is as much HTTP as a call)."""
    path = MODULES[name]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def is_domain(name: str) -> bool:
    parts = name.split(".")
    return (parts[-1] == "service" or (
        len(parts) > 2 and parts[1] in DOMAIN_FEATURES and parts[-1] not in HTTP_MODULES))


def http_imports(name: str) -> list[str]:
    return sorted(m for m in _all_imports(name) if m.split(".")[0] in HTTP_LIBRARIES)


def test_the_http_rule_knows_the_modules() -> None:
    # A rule that matched nothing would pass.
    for name in ("exporter.exports.service", "exporter.stored.service",
                 "exporter.files.service", "exporter.access.service",
                 "exporter.exports.request", "exporter.stored.resume_copies"):
        assert is_domain(name), name
    assert not is_domain("exporter.exports.responses")
    assert not is_domain("exporter.web.page")
    assert http_imports("exporter.exports.responses") and http_imports("exporter.state")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_domain(n)))
def test_services_and_domain_modules_are_http_free(name: str) -> None:
    """A service takes plain values (an ExportRequest, a Principal, the parts of the
    state it uses) and returns domain results or raises domain errors (errors.py); the
    request is read, and responses made, in routes.py and the feature's responses
    module."""
    assert not http_imports(name), f"{name} imports {http_imports(name)}"


def _names_state(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return _names_state(ast.parse(annotation.value, mode="eval").body)
    return any((isinstance(n, ast.Name) and n.id in STATE_TYPES)
               or (isinstance(n, ast.Attribute) and n.attr in STATE_TYPES)
               for n in ast.walk(annotation))


def takes_state(name: str) -> list[str]:
    """The functions of module `name` with a parameter of type State (or StateDep)."""
    path = MODULES[name]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs,
                     *([args.vararg] if args.vararg else []),
                     *([args.kwarg] if args.kwarg else [])]
            if any(_names_state(a.annotation) for a in every):
                found.append(f"{node.name} (line {node.lineno})")
    return found


def sees_state(name: str) -> bool:
    last = name.rpartition(".")[2]
    return name in STATE_MODULES or last in ("deps", "routes", "downloads", "page")


def test_the_state_rule_knows_the_functions() -> None:
    assert takes_state("exporter.access.deps"), "the dependencies do take the state"
    assert not sees_state("exporter.exports.service")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not sees_state(n)))
def test_only_routes_see_the_state_whole(name: str) -> None:
    """Routes hand services the parts of the state they use (the catalog, the limiter,
    a feature's record such as exports/context.py's Exports), never State whole."""
    assert not takes_state(name), f"{name}: {takes_state(name)} take State"
