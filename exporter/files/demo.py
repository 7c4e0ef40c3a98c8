"""Demo files: a nested folder, a non-ASCII name with spaces, an empty file, a large file."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

LARGE_NAME = "large.bin"
UNICODE_NAME = "Ünïcødé résumé \u2013 naïve café.txt"  # with an en dash
_BLOCK = 1024 * 1024
_POOL = 16 * _BLOCK


def write_large(path: Path, size: int, seed: int = 4) -> None:
    """`size` bytes of random-looking data, fast: 1 MiB slices of a 16 MiB random pool.

    Each slice starts at a different, seeded offset, so the content does not repeat
    with a short period and a checksum catches a misplaced block.
    """
    rng = random.Random(seed)
    pool = rng.randbytes(_POOL + _BLOCK)
    view = memoryview(pool)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb", buffering=0) as f:
        left = size
        while left:
            n = min(_BLOCK, left)
            start = rng.randrange(_POOL)
            f.write(view[start:start + n])
            left -= n
    os.replace(tmp, path)  # a half-written file never has the final name


def create(root: Path, large_size: int) -> list[Path]:
    """(Re)create the demo files under `root`; other files there are left alone."""
    nested = root / "nested" / "deeper"
    nested.mkdir(parents=True, exist_ok=True)
    texts = {
        root / "README.txt": "Demo files served by exporter.\n",
        root / UNICODE_NAME: "A name with accents, spaces and a dash: ask for it with"
                             " curl -OJ or wget --content-disposition.\n",
        root / "nested" / "data.json": json.dumps({"demo": True, "items": [1, 2, 3]}) + "\n",
        nested / "notes.md": "# Notes\n\nIn a folder inside a folder.\n",
    }
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    (root / "empty.bin").write_bytes(b"")
    write_large(root / LARGE_NAME, large_size)
    return [*texts, root / "empty.bin", root / LARGE_NAME]


def is_empty(root: Path) -> bool:
    return not root.is_dir() or next(root.iterdir(), None) is None


def parse_size(text: str) -> int:
    """`1073741824`, `512M`, `1G`, `1GiB`: binary units."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    factor = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    size = int(float(number) * factor)
    if size < 0:
        raise ValueError("a size is not negative")
    return size
