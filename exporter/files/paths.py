"""Safe resolution of a request path to a file or folder under the files root.

Why it works this way: docs/internals.md, section `files/paths.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import ApiError

# Linux limits (NAME_MAX, PATH_MAX); longer names cannot exist, so they are bad requests.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
# As the kernel's own limit on links followed in one lookup (MAXSYMLINKS).
MAX_LINKS = 40

_PATH = getattr(os, "O_PATH", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Every step of the walk: never follow a link, never block (a FIFO), never acquire a
# controlling terminal (a device).
_STEP = _PATH | os.O_NOFOLLOW | _CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC


_Opener = Callable[..., int]


class NotCached(BlockingIOError):
    """A walk that must not wait (`FilesRoot.open(..., cached=True)`) would have to: a
    name the kernel's caches do not hold, a link to read, or no `openat2` here."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on every Linux architecture (5.6 and later)
_RESOLVE_CACHED = 0x20  # Linux 5.12: fail with EAGAIN where the lookup would need I/O
_syscall = getattr(ctypes.CDLL(None, use_errno=True), "syscall", None)
if _syscall is not None:
    _syscall.restype = ctypes.c_long
_cached_opens = _syscall is not None and sys.platform == "linux"


def _open_cached(name: str | Path, flags: int, dir_fd: int | None = None) -> int:
    """os.open that never waits for a disk or a network: the path is looked up in the
    kernel's caches only (openat2's RESOLVE_CACHED); NotCached where that is not enough."""
    global _cached_opens
    if not _cached_opens:
        raise NotCached("openat2 with RESOLVE_CACHED is not available")
    how = _OpenHow(flags, 0, _RESOLVE_CACHED)
    # syscall(2) is variadic: every argument a full `long`, as the kernel reads them.
    assert _syscall is not None
    fd: int = _syscall(ctypes.c_long(_SYS_OPENAT2),
                       ctypes.c_long(-100 if dir_fd is None else dir_fd),  # AT_FDCWD
                       ctypes.c_char_p(os.fsencode(name)), ctypes.byref(how),
                       ctypes.c_long(ctypes.sizeof(how)))
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code == errno.EAGAIN:
        raise NotCached(f"{name!s} is not in the kernel's caches")
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
        # An older kernel (no openat2, or no RESOLVE_CACHED), or a sandbox that forbids it.
        _cached_opens = False
        raise NotCached("openat2 with RESOLVE_CACHED is not available")
    raise OSError(code, os.strerror(code), str(name))


def printable(name: str) -> str:
    """A name for JSON, logs and headers: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def storable(path: str) -> str:
    """A path for the database (audit rows, digest keys): bytes that are not UTF-8 are
    written as `\\xFF`, so two such names stay apart where U+FFFD would merge them."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def not_found(path: str) -> ApiError:
    # The same answer for "absent", "outside" and "not a regular file": a probe learns nothing.
    return ApiError(404, f"no file at '{printable(path[:200])}'")


def bad_path(reason: str) -> ApiError:
    return ApiError(400, f"not a valid path: {reason}", parameter="path")


def segments(path: str, serve_hidden: bool) -> tuple[list[str], bool]:
    """The path's names, and whether it ended with a slash; raises on anything odd. The
    rules of every files source: a folder's (FilesRoot) and a store's (files/store.py)."""
    if any(c == "\x00" or ord(c) < 0x20 or c == "\x7f" for c in path):
        raise bad_path("control characters or NUL")
    if "\\" in path:
        raise bad_path("backslash")
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise bad_path("too long")
    wants_folder = path == "" or path.endswith("/")
    names = path[:-1].split("/") if path.endswith("/") else path.split("/")
    if path == "":
        return [], True
    for name in names:
        if len(os.fsencode(name)) > MAX_NAME_BYTES:
            raise bad_path("a name is longer than 255 bytes")
        # An empty name is an absolute path or `//`; `.` and `..` walk the tree.
        if name in ("", ".", "..") or (name.startswith(".") and not serve_hidden):
            raise not_found(path)
    return names, wants_folder


class Outside(Exception):
    """The walk would leave the root, meet a hidden name, or cannot go on: a 404."""


@dataclass
class Target:
    """A checked path: `relative` as the client named it, `real_relative` where the walk
    ended (links resolved), and, while open, a descriptor of what is there.

    `fd` is O_RDONLY on the file or folder itself, owned by whoever holds the Target:
    `close()` it, or `detach()` it to hand it on; -1 for a file opened without `open_file`.
    """

    relative: str
    real_relative: str
    stat: os.stat_result
    wants_folder: bool  # the request ended with a slash
    fd: int = field(default=-1, repr=False)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.stat.st_mode)

    @property
    def name(self) -> str:
        return self.relative.rsplit("/", 1)[-1]

    def detach(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        fd = self.detach()
        if fd >= 0:
            os.close(fd)


@dataclass
class _Walk:
    """Descriptors (O_PATH) of the folders from the root down to where the walk is."""

    fds: list[int]
    names: list[str]
    opener: _Opener  # os.open, or _open_cached for a walk that must not wait

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds, self.names = [], []


class FilesRoot:
    def __init__(self, root: Path, *, serve_hidden: bool = False) -> None:
        # The configured root may itself be a link (the operator's choice, followed on each
        # request: a link switched to a new release is served at once); below it, none is
        # followed blindly.
        self.configured = root
        self.serve_hidden = serve_hidden

    @functools.cached_property
    def root(self) -> Path:
        """The root's real path. Only an absolute link below it and the commands need it:
        resolving it (an lstat per component, in Python) was a tenth of a file request's
        CPU, where opening the root follows the link in the kernel."""
        return Path(os.path.realpath(self.configured))

    def real(self, target: Target) -> Path:
        """Where the target is on this machine (the commands name the files they read)."""
        return self.root.joinpath(*target.real_relative.split("/"))

    def segments(self, path: str) -> tuple[list[str], bool]:
        """The path's names, and whether it ended with a slash; raises on anything odd."""
        return segments(path, self.serve_hidden)

    def resolve(self, path: str) -> Target:
        """The target at `path`, checked and closed (for callers that only need to know)."""
        target = self.open(path)
        target.close()
        return target

    def open(self, path: str, *, open_file: bool = True, cached: bool = False) -> Target:
        """The target at `path`, with `fd` open for reading it (file) or listing it (folder);
        without `open_file`, a file is checked but not opened (`fd` -1: another program
        reads it, as nginx does with X-Accel-Redirect). `cached`: only if that needs no
        disk (NotCached else), so that the event loop may do it."""
        names, wants_folder = self.segments(path)
        relative = "/".join(names)
        try:
            real_names, st, fd = self.walk(names, open_file=open_file, cached=cached)
        except Outside:
            raise not_found(path) from None
        target = Target(relative, "/".join(real_names), st, wants_folder, fd)
        if wants_folder and not target.is_dir:
            target.close()
            raise not_found(path)
        return target

    def walk(self, names: list[str], *, open_folder: bool = True, open_file: bool = True,
             cached: bool = False) -> tuple[list[str], os.stat_result, int]:
        """Walk `names` from the root: (the real names, the stat, an O_RDONLY descriptor
        of the folder or file, or -1 where `open_folder` or `open_file` says not to) of a
        regular file or folder; else Outside. `cached`: NotCached where a step would wait."""
        opener: _Opener = _open_cached if cached else os.open
        root_fd = opener(self.configured, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        w = _Walk([root_fd], [], opener)
        try:
            return self._walk(w, list(names), open_folder, open_file)
        except NotCached:
            raise
        except OSError as error:
            raise Outside(str(error)) from None
        finally:
            w.close()

    def _walk(self, w: _Walk, pending: list[str], open_folder: bool, open_file: bool
              ) -> tuple[list[str], os.stat_result, int]:
        pending.reverse()  # a stack: the next name is at the end
        links = 0
        while True:
            if not pending:
                # Only the root itself (no names) ends here.
                return self._finish(w, ".", w.fds[-1], open_folder, open_file, names=[])
            name = pending.pop()
            if name in ("", "."):
                continue  # only link texts have these: `a//b`, `./b`
            if name == "..":
                if len(w.fds) == 1:
                    raise Outside("above the root")
                os.close(w.fds.pop())
                w.names.pop()
                continue
            if not self.is_visible(name) or len(os.fsencode(name)) > MAX_NAME_BYTES:
                raise Outside("a hidden name")
            fd = w.opener(name, _STEP, dir_fd=w.fds[-1])
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                if w.opener is not os.open:
                    raise NotCached("a link to read")  # its text may be on the disk
                links += 1
                if links > MAX_LINKS:
                    raise Outside("too many links")
                text = os.readlink(name, dir_fd=w.fds[-1])
                if text.startswith("/"):
                    # An absolute link is followed only if its text names the root.
                    root = str(self.root)
                    if not (text == root or text.startswith(root + "/")):
                        raise Outside("an absolute link out of the root")
                    while len(w.fds) > 1:
                        os.close(w.fds.pop())
                        w.names.pop()
                    text = text[len(root):]
                pending.extend(reversed(text.split("/")))
                continue
            if stat.S_ISDIR(st.st_mode) and pending:
                w.fds.append(fd)
                w.names.append(name)
                continue
            if not pending:
                try:
                    return self._finish(w, name, fd, open_folder, open_file,
                                        names=[*w.names, name], st=st)
                finally:
                    os.close(fd)
            os.close(fd)
            raise Outside("not a folder")  # a file, FIFO or device in the middle of a path

    def _finish(self, w: _Walk, name: str, path_fd: int, open_folder: bool, open_file: bool,
                names: list[str], st: os.stat_result | None = None
                ) -> tuple[list[str], os.stat_result, int]:
        st = st or os.fstat(path_fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise Outside("not a regular file or folder")  # FIFOs, sockets, devices
        if not (open_folder if stat.S_ISDIR(st.st_mode) else open_file):
            return names, st, -1
        if stat.S_ISDIR(st.st_mode):
            fd = w.opener(".", os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC, dir_fd=path_fd)
        else:
            # Opened by name in the folder already held; if something else was swapped in
            # since the O_PATH step, it is a different inode and is turned away.
            fd = w.opener(name, _READ, dir_fd=w.fds[-1])
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise Outside("changed during the walk")
        return names, opened, fd

    def is_visible(self, name: str) -> bool:
        return self.serve_hidden or not name.startswith(".")
