"""The programs the tests drive besides Python: curl, wget, aria2c, ss, nginx, Chromium,
and Debian's PostgreSQL 15.

A test that runs one says so with `@pytest.mark.needs("curl", ...)`. Where one is missing
the test is skipped, with the reason in the `-ra` summary: a newcomer without root gets
every other test (scripts/test installs the packages only as root). In CI a missing program
fails the tests that need it instead: CI runs every test (`.ci/run` sets CI=true, as
GitHub Actions and GitLab do).

`python -m tests.tools` prints the Debian packages to install, for scripts/test.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Tool:
    name: str
    package: str  # Debian's
    # Where it is when not on PATH (sbin is not on a user's PATH), or the one path the
    # tests launch it by (Playwright starts Debian's Chromium, never its own downloads).
    paths: tuple[str, ...] = ()
    on_path: bool = True

    def found(self) -> bool:
        if self.on_path and shutil.which(self.name) is not None:
            return True
        return any(Path(p).exists() for p in self.paths)


TOOLS = {t.name: t for t in (
    Tool("curl", "curl"),
    Tool("wget", "wget"),
    # aria2c -x 8 opens 8 connections at once (tests/test_hardening_limits.py).
    Tool("aria2c", "aria2"),
    # The explicit .zst export URLs are decoded with it (tests/test_compression.py).
    Tool("zstd", "zstd"),
    # The benchmark harness measures TCP queues with it; its quick mode is a test.
    Tool("ss", "iproute2", ("/usr/sbin/ss", "/sbin/ss")),
    # The file-serving reference of the benchmarks, and docs/deploy.md's proxy.
    Tool("nginx", "nginx", ("/usr/sbin/nginx",)),
    Tool("chromium", "chromium", ("/usr/bin/chromium",), on_path=False),
    # postgrest-js, as supabase-js runs it (tests/test_postgrest_clients.py); npm installs it.
    Tool("node", "nodejs"),
    Tool("npm", "npm"),
    # XLSX exports are opened by LibreOffice, headless, converted to CSV (tests/test_xlsx.py).
    Tool("soffice", "libreoffice-calc-nogui"),
    # The version-dependent tests run on a throwaway cluster of it too (tests/conftest.py
    # skips or fails those itself: they are parametrized, not marked).
    Tool("postgresql-15", "postgresql-15", ("/usr/lib/postgresql/15/bin/pg_ctl",),
         on_path=False),
)}

def required() -> bool:
    """In CI every test must run: a missing program is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(names: tuple[str, ...]) -> list[Tool]:
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise pytest.UsageError(f"needs(): unknown tools {unknown}; known: {list(TOOLS)}")
    return [TOOLS[n] for n in names if not TOOLS[n].found()]


def reason(tools: list[Tool]) -> str:
    names = ", ".join(t.name for t in tools)
    packages = " ".join(t.package for t in tools)
    return (f"{names} not installed (Debian: apt-get install {packages};"
            " scripts/test installs it when run as root)")


_MISSING = pytest.StashKey[str]()


def mark_missing(items: list[pytest.Item]) -> None:
    """At collection: skip the tests whose programs are missing, or in CI note them for
    `fail_missing` (a skip mark is shown at the test's own line in the summary)."""
    for item in items:
        names = tuple(n for mark in item.iter_markers("needs") for n in mark.args)
        absent = missing(names)
        if not absent:
            continue
        if required():
            item.stash[_MISSING] = reason(absent) + "; in CI every test must run"
        else:
            item.add_marker(pytest.mark.skip(reason=reason(absent)))


def fail_missing(item: pytest.Item) -> None:
    """At set-up, before any fixture starts a server: fail what CI could not run."""
    why = item.stash.get(_MISSING, None)
    if why is not None:
        pytest.fail(why, pytrace=False)


if __name__ == "__main__":
    # One package a line; argv picks tools, else all of them.
    for tool in missing(tuple(sys.argv[1:]) or tuple(TOOLS)):
        print(tool.package)
