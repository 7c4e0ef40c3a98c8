"""GET /: the HTML page of what the caller may download; POST /session signs in with a
token kept in an HttpOnly cookie, POST /session/end signs out."""

from __future__ import annotations

import base64
import binascii
import shlex
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape

from exporter.access.authenticate import COOKIE, authenticate
from exporter.access.cli import DEMO_TOKEN_NAME
from exporter.access.deps import StateDep
from exporter.access.principal import ANONYMOUS, TOKEN, Principal
from exporter.errors import ApiError
from exporter.exports import renderers
from exporter.exports.catalog import Column, Dataset
from exporter.exports.operators import BOOLEAN_KEYWORDS, TABLE, Operand
from exporter.exports.query import RESERVED
from exporter.exports.visible import export_urls, visible_datasets
from exporter.files.listing import url_path
from exporter.files.paths import not_found, printable
from exporter.files.visible import folder_listing, open_path
from exporter.state import State

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(env=Environment(
    loader=PackageLoader("exporter.web", "templates"), autoescape=select_autoescape(),
))
# Every command the page shows quotes its arguments for a POSIX shell, as page.js's
# shellQuote does: a dataset or file name may hold quotes, $( ) and the rest.
templates.env.filters["shell_quote"] = shlex.quote


def size_text(size: int) -> str:
    """A file's size as the page shows it: "31 bytes", "1.5 KiB" (binary units, as
    `ls -lh` and the prepared downloads' sizes in page.js)."""
    if size < 1024:
        return f"{size} byte" if size == 1 else f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


templates.env.filters["size"] = size_text

FOLDER_ENTRIES = 1000  # a page of a folder's listing; ?page=N shows the next ones
FORM_BYTES = 4096
# A page number past this is taken as the last page: no folder has a billion entries,
# and an offset that large would only cost a walk of the index.
MAX_PAGE = 1_000_000
# What the builder's value field is for a column, from the type SQL compares the value
# as (a domain's base type, no modifier): a date or time picker, a number field,
# true / false, or text. Anything else is text, checked by PostgreSQL as before.
INPUTS = {
    "date": "date",
    "timestamp without time zone": "datetime",
    "timestamp with time zone": "datetimetz",
    "time without time zone": "time",
}
# The words the builder shows for `is.`'s keywords (the URL keeps the keyword itself).
KEYWORD_LABELS = {"null": "empty (null)", "not_null": "not empty", "true": "true",
                  "false": "false", "unknown": "unknown (null)"}


@router.get("/")
async def page(request: Request, st: StateDep) -> Response:
    path = _query_path(request)
    principal = await authenticate(request, st.tokens, st.links, st.settings, page=True)
    known = st.settings.demo_token_file
    demo_token = str(known) if known is not None else None
    base_url = str(request.base_url)
    datasets = [_dataset(base_url, ds) for ds in await visible_datasets(st.catalog, principal)]
    number = _page_number(request.query_params.get("page"))
    folder, folder_error = await _folder(st, principal, path, base_url, number)
    context = {
        "principal": principal,
        "signed_in": principal.kind != ANONYMOUS,
        "cookie_rejected": COOKIE in request.cookies and principal.kind == ANONYMOUS,
        "sign_in_failed": request.query_params.get("signin") == "failed",
        "datasets": datasets,
        "folder": folder,
        "folder_error": folder_error,
        "crumbs": _crumbs(_folder_path(path)) if folder else [],
        "operators": builder_operators(),
        "operands": builder_operands(),
        "admin": principal.is_admin,
        # Where `exporter serve` keeps the demo token it printed (the embedded database).
        "demo_token": demo_token,
        # The line that sets the commands' token, where the page knows where it is: the
        # demo token's file. Never the token itself: the cookie is HttpOnly so that no
        # script on the page can read it, and the page's HTML is read by its scripts.
        "token_export": (f"export EXPORTER_TOKEN=\"$(cat {shlex.quote(demo_token)})\""
                         if demo_token and principal.kind == TOKEN
                         and principal.name == DEMO_TOKEN_NAME else None),
        "reserved": sorted(RESERVED),  # column names the builder must quote
        "formats": [r.name for r in renderers.all_renderers()],
        "root": _root(request),  # every link and form of the page starts with it
    }
    response = templates.TemplateResponse(request, "page.html", context)
    # What the page shows depends on the cookie: no shared cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def builder_operators() -> list[dict[str, Any]]:
    """The filter builder's operators, from the exports' table (page.js has no list of its
    own); `not.` and the rest of the grammar stay for hand-made URLs."""
    return [{"name": o.name, "label": o.label, "hint": o.hint, "list": o.operand is Operand.LIST}
            for o in TABLE]


def builder_operands() -> dict[str, dict[str, Any]]:
    """How the builder takes each operator's operand (a value, values one a line, a
    pattern, or one of its keywords, in words), kept apart from `builder_operators` so
    that page.js names no operator of its own."""
    return {o.name: {"kind": o.operand.value,
                     "keywords": [{"value": k, "label": KEYWORD_LABELS.get(k, k),
                                   "boolean": k in BOOLEAN_KEYWORDS} for k, _ in o.keywords]}
            for o in TABLE}


def input_kind(column: Column) -> str:
    """The builder's value field for a column (see INPUTS)."""
    if column.category == "B":
        return "boolean"
    if column.category == "N":
        return "number"
    return INPUTS.get(column.base_type, "text")


def _dataset(base_url: str, ds: Dataset) -> dict[str, Any]:
    columns = list(ds.columns.values())
    return {
        "name": ds.name,
        "kind": ds.kind,
        "estimated_rows": ds.estimated_rows,
        "columns": [{"name": c.name, "type": c.type, "input": input_kind(c),
                     # The conditions its type has ("contains" for arrays, not numbers).
                     "operators": [o.name for o in TABLE if o.fits(c.category, c.base_type)]}
                    for c in columns],
        # What a limit is ordered by when no order is chosen: a limited download is then
        # the same rows every time (PostgreSQL's order without ORDER BY is arbitrary).
        "default_order": ds.primary_key or [c.name for c in columns[:1]],
        "urls": export_urls(base_url, ds),
    }


def _page_number(raw: str | None) -> int:
    """?page=N of a folder's listing; anything but a whole number from 1 is page 1."""
    if raw is None or not raw.isascii() or not raw.isdigit():
        return 1
    return max(1, min(MAX_PAGE, int(raw[:7])))


def sha256_hex(digest: str | None) -> str | None:
    """The hex that `sha256sum` prints, from the listing's `sha-256=:BASE64:`."""
    if not digest or not digest.startswith("sha-256=:") or not digest.endswith(":"):
        return None
    try:
        raw = base64.b64decode(digest[len("sha-256=:"):-1], validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def check_line(hex_digest: str, name: str) -> str:
    """The command that checks a downloaded file, as `sha256sum -c` reads its own output
    (two spaces between digest and name), quoted for a POSIX shell."""
    return f"echo {shlex.quote(f'{hex_digest}  {name}')} | sha256sum -c"


def _query_path(request: Request) -> str:
    """`?path=`, with bytes that are not UTF-8 kept (as `os.fsdecode` names files): the
    framework's own parsing would turn them into U+FFFD, naming no file."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    values = [v for k, v in parse_qsl(query, errors="surrogateescape") if k == "path"]
    return values[-1] if values else ""


def _folder_path(path: str) -> str:
    return path.strip("/") + "/" if path.strip("/") else ""


async def _folder(st: State, principal: Principal, path: str, base_url: str,
                  number: int = 1) -> tuple[dict[str, Any] | None, str | None]:
    """The listing of `path` (a folder under the files root), or why there is none."""
    path = _folder_path(path)
    if not principal.may_list_folder(path) and not path:
        return None, None  # no files for this caller: the page has no files section
    try:
        root, target = await open_path(st.settings, principal, path, st.files_store)
        try:
            if not target.is_dir:
                raise not_found(path)
            listing = await folder_listing(st.engine, principal, root, target, base_url,
                                           FOLDER_ENTRIES, (number - 1) * FOLDER_ENTRIES,
                                           dirs_first=True)
        finally:
            target.close()
    except ApiError as error:
        return None, error.message
    files_url = base_url.rstrip("/") + "/files/"
    for e in listing["entries"]:
        if e["kind"] == "dir":
            # The folder's own page: its path as the listing's URL spells it (exact bytes).
            e["page_path"] = e["url"][len(files_url):]
        elif (hex_digest := sha256_hex(e.get("digest"))) is not None:
            e["sha256"] = hex_digest
            e["check"] = check_line(hex_digest, e["name"])
    listing["url_path"] = url_path(path)
    pages = max(1, -(-listing["total"] // FOLDER_ENTRIES))
    listing["page"] = number  # past the last one, the page says so
    listing["pages"] = pages
    return listing, None


def _crumbs(path: str) -> list[tuple[str, str]]:
    """(name to show, percent-encoded folder path) from the root down to `path`."""
    names = [n for n in path.split("/") if n]
    return [(printable(name), url_path("/".join(names[:i + 1]) + "/"))
            for i, name in enumerate(names)]


@router.post("/session")
async def sign_in(request: Request, st: StateDep) -> Response:
    _same_origin(request)
    token = (await _form(request)).get("token", "").strip()
    root = _root(request)
    if not token or await st.tokens.principal(token) is None:
        return RedirectResponse(f"{root}/?signin=failed", status_code=303)
    response = RedirectResponse(f"{root}/", status_code=303)
    # Strict is enough: clicks on the page's own links are same-site navigations. The
    # scheme is the client's (X-Forwarded-Proto from a trusted proxy): Secure behind TLS.
    response.set_cookie(COOKIE, token, path=f"{root}/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/session/end")
async def sign_out(request: Request) -> Response:
    _same_origin(request)
    root = _root(request)
    response = RedirectResponse(f"{root}/", status_code=303)
    response.delete_cookie(COOKIE, path=f"{root}/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


def _same_origin(request: Request) -> None:
    """Browsers send Origin with every form POST: one from another site is refused, so
    it cannot sign a visitor in with a token of its choosing."""
    origin = request.headers.get("origin")
    # An origin is scheme://host[:port], without the path (or EXPORTER_ROOT_PATH) of the
    # base URL; the scheme is the client's when a trusted proxy says so.
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise ApiError(403, "sign in and out from this server's own page")


def _root(request: Request) -> str:
    """EXPORTER_ROOT_PATH as the request carries it ("" at the root)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (Starlette's own parser would need python-multipart)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_BYTES:
            raise ApiError(413, f"the form is larger than {FORM_BYTES} bytes")
    return dict(parse_qsl(body.decode("utf-8", "replace")))
