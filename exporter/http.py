"""HTTP details shared by every download: Content-Disposition and content negotiation."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

# RFC 6266 / RFC 8187: characters that may stand unencoded in `filename*`.
_ATTR_CHARS = "!#$&+-.^_`|~"
_TOKEN_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\%;]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A file name that is not valid UTF-8 on disk reaches Python with lone surrogates, which
# no encoder accepts.
_SURROGATE = re.compile("[\ud800-\udfff]")


def content_disposition(
    filename: str, disposition: str = "attachment", *, user_agent: str | None = None
) -> str:
    """`attachment; filename="..."` plus `filename*=UTF-8''...` when the name is not plain ASCII.

    The ASCII fallback drops accents where it can and replaces what is left, so old
    clients still get a usable name; browsers and wget use `filename*`. curl (`-OJ`)
    reads only `filename=`, so for curl that parameter carries the name itself, as
    UTF-8 bytes.
    """
    filename = _SURROGATE.sub("\ufffd", filename.replace("/", "_").replace("\x00", ""))
    fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    fallback = _TOKEN_UNSAFE.sub("_", fallback) or "download"
    if fallback == filename:
        return f'{disposition}; filename="{fallback}"'
    if user_agent is not None and user_agent.startswith("curl/"):
        escaped = filename.replace("\\", "\\\\").replace('"', '\\"')
        # Header values travel as latin-1 in ASGI: this spells the UTF-8 bytes.
        fallback = _CONTROL.sub("_", escaped).encode().decode("latin-1")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''" + quote(
        filename, safe=_ATTR_CHARS
    )


def parse_accept(header: str | None) -> list[str]:
    """Media types of an Accept header, best first (q=0 dropped), `*/*` when absent."""
    if not header or not header.strip():
        return ["*/*"]
    weighted = []
    for position, item in enumerate(header.split(",")):
        media_type, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media_type and q > 0:
            weighted.append((-q, position, media_type.lower()))
    return [media_type for _, _, media_type in sorted(weighted)]
