"""Every shell block of README.md and docs/*.md, run exactly as printed.

The blocks fenced as ```sh, ```bash or ```console (of a console block, the lines that
start with `$ `, without it) of one page run in order, as one `bash -euo pipefail`
script, in a folder of their own, against a server started as the README says (the
session's database, a data folder of its own with the demo files and a demo token in
`var/demo-token`), with the system's curl and wget; the script must exit 0.

Conventions of the pages:
- `<!-- not run: REASON -->` on the line before a block: not run, reported as skipped
  with that reason (a block that serves until stopped, needs another machine, or would
  change what the other tests share).
- `<!-- recipe: NAME -->` on the line before a block (of any language): written to the
  file NAME in the folder at that point, for the later blocks to run (its own tests, as
  tests/test_pull_recipe.py, run it harder).

What differs from a reader's terminal, and why:
- `127.0.0.1:8000` becomes the test server's address (it listens on a free port), in the
  blocks and recipes alike, and `EXPORTER_PORT` is that port (for `exporter link`, which
  makes links at `EXPORTER_HOST:EXPORTER_PORT`).
- `.venv/bin/exporter` (and `.venv/bin/python`) in the folder run this checkout's
  package with the tests' Python, and `EXPORTER_DATABASE_URL` is the session's database:
  a reader's `.venv/bin/exporter` finds the embedded one under `var/` by itself.
- `var` in the folder is a link to the server's data folder; `HOME` is the folder, so
  that no ~/.curlrc or ~/.wgetrc of the machine counts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.files.demo import create as create_demo_files
from tests.support import ROOT, Server, forked
from tests.test_access import new_token

pytestmark = [pytest.mark.needs("curl"), pytest.mark.needs("wget")]

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "console"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!-- (not run|recipe): (.+?) -->\n\Z")
DOCUMENTED = "127.0.0.1:8000"
LARGE_FILE = 2 * 1024 * 1024  # the demo's large.bin, small: the blocks download it often
TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    text: str
    not_run: str | None
    recipe: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def commands(self) -> str:
        if self.language != "console":
            return self.text
        return "".join(line[2:] + "\n" for line in self.text.splitlines()
                       if line.startswith("$ "))


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for fence in FENCE.finditer(text):
        before = text[:fence.start()]
        previous = before[before.rstrip("\n").rfind("\n") + 1:]
        mark = MARK.fullmatch(previous) if previous.startswith("<!--") else None
        found.append(Block(
            page, before.count("\n") + 1, fence.group(1), fence.group(2),
            not_run=mark.group(2) if mark and mark.group(1) == "not run" else None,
            recipe=mark.group(2) if mark and mark.group(1) == "recipe" else None))
    return found


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page)
            if b.not_run is None and (b.recipe is not None or b.language in SHELLS)]


def script(page: Path, port: int) -> str:
    """The page's blocks as one bash script, each announced on stderr with the time
    (a failure's output then names its block, and a slow block shows)."""
    parts = []
    for block in runnable(page):
        body = block.commands().replace(DOCUMENTED, f"127.0.0.1:{port}")
        parts.append(f"printf '### %s at %s\\n' '{block.where}' \"$EPOCHREALTIME\" >&2\n")
        if block.recipe is not None:
            assert re.fullmatch(r"[\w.-]+", block.recipe), block.recipe
            parts.append(f"cat > {block.recipe} <<'END_OF_RECIPE'\n{body}END_OF_RECIPE\n")
        else:
            parts.append(body)
    return "".join(parts)


@dataclass(frozen=True)
class Site:
    server: Server
    data: Path


@pytest.fixture(scope="module")
def site(database_url: str, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Site]:
    """The server `./scripts/serve` would run, on the session's database: its data
    folder with the demo files and the demo token's file."""
    data = tmp_path_factory.mktemp("docs") / "var"
    create_demo_files(data / "files", LARGE_FILE)
    token = new_token(database_url, f"demo-{uuid.uuid4().hex[:8]}",
                      "datasets:*", "files:*", "admin")
    (data / "demo-token").write_text(token + "\n")
    with Server(database_url, logs_dir / "docs-server.log",
                {"EXPORTER_DATA_DIR": str(data),
                 "EXPORTER_EXPORTS_DIR": str(data / "exports")}) as server:
        yield Site(server, data)


def reader_folder(folder: Path, site: Site) -> None:
    """A folder like a checkout's, as far as the blocks can tell."""
    (folder / "var").symlink_to(site.data)
    bin_ = folder / ".venv" / "bin"
    bin_.mkdir(parents=True)
    # A script, not a link: a linked python finds no pyvenv.cfg beside the link and
    # starts without the virtualenv's packages.
    python = bin_ / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    exporter = bin_ / "exporter"
    # Run by the fork server (tests/forkclient.py): the same module, in this folder, with
    # this environment and streams, without importing the app again for each command.
    exporter.write_text(f'#!/bin/sh\nexec {shlex.join(forked("exporter.cli"))} "$@"\n')
    exporter.chmod(0o755)


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_block_runs_as_printed(page: Path, site: Site, database_url: str,
                                           tmp_path: Path) -> None:
    reader_folder(tmp_path, site)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "EXPORTER_DATABASE_URL": database_url, "EXPORTER_PORT": str(site.server.port),
           "EXPORTER_EXPORTS_DIR": str(site.data / "exports")}
    env.pop("EXPORTER_TOKEN", None)  # the blocks set it, as a reader does
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script(page, site.server.port)],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, (
        f"exit {done.returncode}\n--- stderr\n{done.stderr[-4000:]}"
        f"\n--- stdout\n{done.stdout[-2000:]}")


NOT_RUN = [b for p in PAGES for b in blocks(p) if b.not_run is not None]


@pytest.mark.parametrize("block", NOT_RUN, ids=lambda b: b.where)
def test_blocks_marked_not_run_say_why(block: Block) -> None:
    assert block.language in SHELLS, f"{block.where}: only shell blocks are run at all"
    pytest.skip(f"{block.where} not run: {block.not_run}")


def test_the_conventions_hold() -> None:
    """Every shell block is run or says why not, every mark sits right above a block,
    and the README keeps to its size."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        marks = len(re.findall(r"<!-- (?:not run|recipe): ", text))
        marked = sum(1 for b in blocks(page) if b.not_run or b.recipe)
        assert marks == marked, f"{page.name}: a mark not right above a fenced block"
    assert any(runnable(p) for p in PAGES)
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_every_link_between_the_pages_leads_somewhere() -> None:
    """The reference moved out of the README: a link to a page or a heading that is not
    there any more fails here."""
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (
                    anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_every_setting_is_in_docs_settings() -> None:
    from exporter.config import Settings

    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    names = [field.validation_alias if isinstance(field.validation_alias, str)
             else f"EXPORTER_{name.upper()}" for name, field in Settings.model_fields.items()]
    assert [n for n in names if f"`{n}`" not in text] == []


def test_every_command_is_in_docs_commands() -> None:
    from typer.main import get_command

    from exporter.cli import app

    text = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    group = get_command(app)
    commands = getattr(group, "commands", {})
    assert commands
    assert [name for name in commands if f"`exporter {name}" not in text] == []
