"""Safe resolution of a request path to a file or folder under the files root.

The path arrives percent-decoded once (by the server), so `%2e%2e%2f` is already
`../` here, and a double-encoded `%252e` is the literal name `%2e`, which is harmless.
Everything is checked on segments, then once more on the real path the kernel
resolves, so a symlink may point anywhere inside the root but nowhere outside.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ApiError

# Linux limits (NAME_MAX, PATH_MAX); longer names cannot exist, so they are bad requests.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def not_found(path: str) -> ApiError:
    # The same answer for "absent", "outside" and "not a regular file": a probe learns nothing.
    return ApiError(404, f"no file at '{path[:200]}'")


def bad_path(reason: str) -> ApiError:
    return ApiError(400, f"not a valid path: {reason}", parameter="path")


@dataclass(frozen=True)
class Target:
    """A checked path: `relative` as the client named it, `real` as the kernel resolves it."""

    relative: str
    real: Path
    stat: os.stat_result
    wants_folder: bool  # the request ended with a slash

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.stat.st_mode)

    @property
    def name(self) -> str:
        return self.relative.rsplit("/", 1)[-1]


class FilesRoot:
    def __init__(self, root: Path, *, serve_hidden: bool = False) -> None:
        self.root = Path(os.path.realpath(root))
        self.serve_hidden = serve_hidden

    def segments(self, path: str) -> tuple[list[str], bool]:
        """The path's names, and whether it ended with a slash; raises on anything odd."""
        if any(c == "\x00" or ord(c) < 0x20 or c == "\x7f" for c in path):
            raise bad_path("control characters or NUL")
        if "\\" in path:
            raise bad_path("backslash")
        if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise bad_path("too long")
        wants_folder = path == "" or path.endswith("/")
        names = path[:-1].split("/") if path.endswith("/") else path.split("/")
        if path == "":
            return [], True
        for name in names:
            if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise bad_path("a name is longer than 255 bytes")
            # An empty name is an absolute path or `//`; `.` and `..` walk the tree.
            if name in ("", ".", "..") or (name.startswith(".") and not self.serve_hidden):
                raise not_found(path)
        return names, wants_folder

    def resolve(self, path: str) -> Target:
        names, wants_folder = self.segments(path)
        relative = "/".join(names)
        real = Path(os.path.realpath(self.root.joinpath(*names)))
        if real != self.root:
            try:
                inside = real.relative_to(self.root)
            except ValueError:
                raise not_found(path) from None
            # A visible link must not lead to a hidden name either.
            if not self.serve_hidden and any(p.startswith(".") for p in inside.parts):
                raise not_found(path)
        try:
            st = os.stat(real)
        except (OSError, ValueError):
            raise not_found(path) from None
        target = Target(relative, real, st, wants_folder)
        if not (target.is_file or target.is_dir):
            raise not_found(path)  # FIFOs, sockets, devices
        if wants_folder and not target.is_dir:
            raise not_found(path)
        return target

    def relative_real(self, target: Target) -> str:
        """Where the target really is, relative to the root (links resolved)."""
        if target.real == self.root:
            return ""
        return target.real.relative_to(self.root).as_posix()

    def is_visible(self, name: str) -> bool:
        return self.serve_hidden or not name.startswith(".")
