"""`exporter digest [PATH]`: compute ahead of time the digests no download has computed
yet; and the demo files that `exporter demo` and `serve` create."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from exporter.clikit import database, require_schema_at_head, start
from exporter.config import Settings
from exporter.db import create_engine
from exporter.errors import ApiError
from exporter.files.digests import DigestStore, FileKey, hash_file
from exporter.files.paths import FilesRoot
from exporter.objects import ObjectChanged, ObjectStore, StoreOptions

log = logging.getLogger("exporter")


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, files: int) -> None:
        self.total = max(total, 1)
        self.files = files
        self.done = 0
        self.file_no = 0
        self.name = ""
        self._start = time.monotonic()
        self._drawn = 0.0

    def next_file(self, name: str) -> None:
        self.file_no += 1
        self.name = name
        self.draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self.draw()

    def draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        share = min(self.done / self.total, 1.0)
        bar = "#" * int(share * 30)
        rate = self.done / max(now - self._start, 1e-6) / 1e6
        name = self.name if len(self.name) <= 40 else "..." + self.name[-37:]
        sys.stderr.write(f"\r[{bar:<30}] {share:6.1%} {self.file_no}/{self.files} files"
                         f" {rate:7.1f} MB/s  {name:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        self.draw(force=True)
        sys.stderr.write("\n")


def _walk(root: FilesRoot, start: Path) -> list[tuple[str, Path]]:
    """Regular files under `start` (itself, if a file), by path relative to the root."""
    found: list[tuple[str, Path]] = []
    if start.is_file():
        return [(start.relative_to(root.root).as_posix(), start)]
    for folder, dirs, files in os.walk(start):
        dirs[:] = sorted(d for d in dirs if root.is_visible(d))
        for name in sorted(files):
            if not root.is_visible(name):
                continue
            relative = (Path(folder) / name).relative_to(root.root).as_posix()
            try:
                target = root.resolve(relative)
            except ApiError:
                continue  # what the server would not serve needs no digest
            if target.is_file:
                found.append((relative, root.real(target)))
    return found


async def compute_missing(settings: Settings, url: str, path: str) -> int:
    if settings.files_store is not None:
        return await _compute_missing_in_store(settings, url, path)
    root = FilesRoot(settings.files_folder, serve_hidden=settings.serve_hidden)
    try:
        start = root.resolve(path.strip("/") + ("/" if path.endswith("/") else ""))
    except ApiError as error:
        print(f"exporter digest: {error.message} under {root.root}", file=sys.stderr)
        return 2
    engine = create_engine(settings, url)
    store = DigestStore(engine)
    try:
        files = _walk(root, root.real(start))
        keys = {rel: FileKey.of(rel, real.stat()) for rel, real in files}
        known = await store.get_many(keys.values())
        todo = [(rel, real) for rel, real in files if rel not in known]
        print(f"{len(files)} files, {len(known)} digests known, {len(todo)} to compute",
              file=sys.stderr)
        progress = Progress(sum(keys[rel].size for rel, _ in todo), len(todo))
        for rel, real in todo:
            progress.next_file(rel)
            sha256 = hash_file(real, settings.file_chunk_size, progress.advance)
            # Stored only if the file did not change while it was read.
            if FileKey.of(rel, real.stat()) == keys[rel]:
                await store.put(keys[rel], sha256)
        progress.close()
    finally:
        await engine.dispose()
    return 0


async def _compute_missing_in_store(settings: Settings, url: str, path: str) -> int:
    """The same for files in object storage: every object under `path` that a request
    could name (files/store.py's rules), read through the store."""
    from exporter.files.store import object_key, open_store_path, servable

    assert settings.files_store is not None
    store = ObjectStore(settings.files_store, StoreOptions.from_settings(settings))
    try:
        start = await open_store_path(store, path.strip("/") + (
            "/" if path.endswith("/") else ""), settings.serve_hidden)
    except ApiError as error:
        print(f"exporter digest: {error.message} under {store.url}", file=sys.stderr)
        return 2
    if start.info is not None:
        objects = [start.info]
    else:
        objects = [o async for page in store.walk(start.relative) for o in page
                   if servable(o.key, settings.serve_hidden)]
    engine = create_engine(settings, url)
    digests = DigestStore(engine)
    try:
        keys = {o.key: object_key(o.key, o) for o in objects}
        known = await digests.get_many(keys.values())
        todo = [o for o in objects if o.key not in known]
        print(f"{len(objects)} files, {len(known)} digests known, {len(todo)} to compute",
              file=sys.stderr)
        progress = Progress(sum(o.size for o in todo), len(todo))
        for o in todo:
            progress.next_file(o.key)
            h = hashlib.sha256()
            try:
                async for chunk in store.read(o.key, 0, o.size,
                                              chunk_size=settings.file_chunk_size_max,
                                              etag=o.etag):
                    h.update(chunk)
                    progress.advance(len(chunk))
            except ObjectChanged:
                continue  # replaced while read: its next download computes it
            await digests.put(keys[o.key], h.digest())
        progress.close()
    finally:
        await engine.dispose()
    return 0


def digest(
    path: Annotated[str, typer.Argument(
        metavar="PATH", help="a file or folder under the files root (default: all of it)")] = "",
) -> None:
    settings = start()
    with database(settings, "digest") as url:
        require_schema_at_head(url, "digest")
        status = asyncio.run(compute_missing(settings, url, path))
    raise SystemExit(status)


def default_root(settings: Settings) -> bool:
    """The demo writes (a 1 GiB file, among others) only into its own folder: a files
    root that someone chose holds their files."""
    return settings.files_root_is_default


def demo_files(settings: Settings, size: str, *, only_if_empty: bool) -> None:
    from exporter.files import demo

    if settings.files_store is not None:
        asyncio.run(_demo_into_store(settings, demo.parse_size(size), only_if_empty))
        return
    root = settings.files_folder
    if only_if_empty and not demo.is_empty(root):
        return
    log.info("creating the demo files in %s (large file: %s)", root, size)
    demo.create(root, demo.parse_size(size))


async def _demo_into_store(settings: Settings, size: int, only_if_empty: bool) -> None:
    """The demo files, made in a temporary folder and uploaded as they are read."""
    import tempfile

    from exporter.files import demo

    assert settings.files_store is not None
    store = ObjectStore(settings.files_store, StoreOptions.from_settings(settings))
    if only_if_empty and await store.folder_exists(""):
        return
    log.info("creating the demo files in %s (large file: %s)", store.url, size)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for path in await asyncio.to_thread(demo.create, root, size):
            writer = store.writer(path.relative_to(root).as_posix())
            try:
                with path.open("rb") as f:
                    while chunk := await asyncio.to_thread(f.read, 1024 * 1024):
                        await writer.write(chunk)
                await writer.complete()
            except BaseException:
                await writer.abort()
                raise


def register(app: typer.Typer) -> None:
    app.command("digest", help="compute the SHA-256 of files whose digest is not known yet"
                " (or stale), with a progress bar")(digest)
