"""A principal (token, link or anonymous client) and what its scopes let it reach.

Scopes: `datasets:*`, `datasets:NAME`, `files:*`, `files:PREFIX/` (a folder and
everything under it) and `admin` (links, the audit trail, and everything else).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from exporter.errors import NO_TOKEN, ApiError

# The scopes, here only: the checks below, token creation and the CLI's help use these.
ADMIN = "admin"
DATASETS, FILES = "datasets:", "files:"  # prefixes of a dataset's name, of a folder
ALL_DATASETS, ALL_FILES = DATASETS + "*", FILES + "*"
SCOPE_FORMS = f"{ALL_DATASETS}, {DATASETS}NAME, {ALL_FILES}, {FILES}FOLDER/ or {ADMIN}"
_SCOPE = re.compile(
    rf"{ADMIN}|{re.escape(ALL_DATASETS)}|{DATASETS}[^\s/]+|{re.escape(ALL_FILES)}|{FILES}(?:[^\s]+/)")

TOKEN, LINK, ANONYMOUS = "token", "link", "anonymous"

CHALLENGES = [
    ("WWW-Authenticate", 'Bearer realm="exporter"'),
    ("WWW-Authenticate", 'Basic realm="exporter", charset="UTF-8"'),
]


def check_scope(scope: str) -> str:
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"bad scope {scope!r}: use {SCOPE_FORMS}")
    return scope


@dataclass(frozen=True)
class Principal:
    kind: str  # token | link | anonymous
    name: str  # the token's name, the link maker's, or the client address
    scopes: frozenset[str]
    link_expires: datetime | None = None
    limit_key: str = ""  # what the concurrency cap counts by
    # The token's row (a token, or a link's maker); a new token of the same name has another.
    token_id: int | None = None

    @property
    def label(self) -> str:
        """For the audit trail and logs: never a secret."""
        if self.kind == TOKEN:
            return f"token {self.name}"
        if self.kind == LINK:
            return f"link by {self.name}"
        return "anonymous"

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def may_read_dataset(self, name: str) -> bool:
        return bool(self.scopes & {ADMIN, ALL_DATASETS, DATASETS + name})

    def may_read_file(self, path: str) -> bool:
        """`path` relative to the files root, without a leading slash."""
        if self.scopes & {ADMIN, ALL_FILES}:
            return True
        return any(path.startswith(folder) for folder in self._folders())

    def may_list_folder(self, path: str) -> bool:
        """A folder may be listed if something in it or under it may be read."""
        folder = path.strip("/") + "/" if path.strip("/") else ""
        if self.may_read_file(folder):
            return True
        return any(f.startswith(folder) for f in self._folders())

    def _folders(self) -> list[str]:
        """The folders of the `files:FOLDER/` scopes."""
        return [s.removeprefix(FILES) for s in self.scopes if s.startswith(FILES)]

    def denied(self) -> ApiError:
        """401 for the anonymous (so they may authenticate), 403 for the others.

        Neither says whether the thing exists.
        """
        if self.kind == ANONYMOUS:
            return ApiError(401, "authentication required: a token as Bearer or as the Basic"
                            " password, or a signed link", headers=CHALLENGES,
                            code=NO_TOKEN)
        return ApiError(403, f"{self.label} may not download this")


def token_limit_key(token_id: int, name: str) -> str:
    """One budget per token: its requests (header or cookie) and the links it made.
    By row, so a new token that reuses a name does not share the old one's slots."""
    return f"token {name} #{token_id}"


def anonymous(
    client: str, public_datasets: Iterable[str], public_files: Iterable[str]
) -> Principal:
    """What the settings make public ("*" for all), for any client."""
    scopes = {DATASETS + name for name in public_datasets}
    scopes |= {ALL_FILES if prefix == "*" else f"{FILES}{prefix.strip('/')}/"
               for prefix in public_files}
    return Principal(ANONYMOUS, client, frozenset(scopes), limit_key=f"anonymous {client}")
