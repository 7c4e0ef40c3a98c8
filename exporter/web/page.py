"""GET /: the HTML page of what the caller may download; POST /session signs in with a
token kept in an HttpOnly cookie, POST /session/end signs out."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape

from exporter.access.authenticate import COOKIE, authenticate
from exporter.access.deps import StateDep
from exporter.access.principal import ANONYMOUS, Principal
from exporter.errors import ApiError
from exporter.exports import renderers
from exporter.exports.catalog import Dataset
from exporter.exports.operators import TABLE, Operand
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

FOLDER_ENTRIES = 1000
FORM_BYTES = 4096


@router.get("/")
async def page(request: Request, st: StateDep) -> Response:
    path = _query_path(request)
    principal = await authenticate(request, st, page=True)
    base_url = str(request.base_url)
    datasets = [_dataset(base_url, ds) for ds in await visible_datasets(st.catalog, principal)]
    folder, folder_error = await _folder(st, principal, path, base_url)
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


def _dataset(base_url: str, ds: Dataset) -> dict[str, Any]:
    return {
        "name": ds.name,
        "kind": ds.kind,
        "estimated_rows": ds.estimated_rows,
        "columns": [{"name": c.name, "type": c.type} for c in ds.columns.values()],
        "urls": export_urls(base_url, ds),
    }


def _query_path(request: Request) -> str:
    """`?path=`, with bytes that are not UTF-8 kept (as `os.fsdecode` names files): the
    framework's own parsing would turn them into U+FFFD, naming no file."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    values = [v for k, v in parse_qsl(query, errors="surrogateescape") if k == "path"]
    return values[-1] if values else ""


def _folder_path(path: str) -> str:
    return path.strip("/") + "/" if path.strip("/") else ""


async def _folder(st: State, principal: Principal, path: str,
                  base_url: str) -> tuple[dict[str, Any] | None, str | None]:
    """The listing of `path` (a folder under the files root), or why there is none."""
    path = _folder_path(path)
    if not principal.may_list_folder(path) and not path:
        return None, None  # no files for this caller: the page has no files section
    try:
        root, target = await open_path(st, principal, path)
        try:
            if not target.is_dir:
                raise not_found(path)
            listing = await folder_listing(st, principal, root, target, base_url,
                                           FOLDER_ENTRIES, 0)
        finally:
            target.close()
    except ApiError as error:
        return None, error.message
    files_url = base_url.rstrip("/") + "/files/"
    for e in listing["entries"]:
        if e["kind"] == "dir":
            # The folder's own page: its path as the listing's URL spells it (exact bytes).
            e["page_path"] = e["url"][len(files_url):]
    listing["url_path"] = url_path(path)
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
