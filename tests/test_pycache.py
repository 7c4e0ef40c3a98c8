"""scripts/test's bytecode cache: the virtualenv's compiled modules are found in it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.pycache import seed


def test_seeded_modules_are_where_python_looks(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site-packages"
    (site / "pkg").mkdir(parents=True)
    source = site / "pkg" / "mod.py"
    source.write_text("VALUE = 1\n")
    monkeypatch.setattr(sys, "pycache_prefix", None)  # scripts/test runs with one
    compiled = Path(importlib.util.cache_from_source(str(source)))  # beside it, as pip does
    compiled.parent.mkdir()
    compiled.write_bytes(b"pyc")
    (compiled.parent / "notes.txt").write_text("not a module")
    prefix = tmp_path / "prefix"

    assert seed(prefix, site) == 1
    monkeypatch.setattr(sys, "pycache_prefix", str(prefix))
    looked_up = Path(importlib.util.cache_from_source(str(source)))
    assert looked_up.is_relative_to(prefix)
    assert looked_up.read_bytes() == b"pyc"
    assert os.path.samefile(looked_up, compiled)
    assert not list(prefix.rglob("notes.txt"))
    # A second run keeps what is there.
    assert seed(prefix, site) == 0
