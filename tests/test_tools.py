"""A newcomer without curl (or without root to install it) gets every other test, and the
curl tests skipped with the reason; CI (CI=true) gets failures instead, never a skip.

pytest runs in a subprocess on the real curl tests of test_files_http.py, with a PATH whose
folder holds links to every program but curl. The tests are skipped or failed before their
fixtures start anything, so no server is started.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tools
from tests.support import ROOT

# The curl tests of one module, and a test that needs no program, which must still run.
SELECTION = ["tests/test_files_http.py",
             "tests/test_files_units.py::test_multipart_layout_length_matches_body",
             "-k", "curl or multipart_layout"]


def path_without(tmp_path: Path, hidden: str) -> str:
    """A PATH of one folder with links to everything on this PATH but `hidden`."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not entry or not Path(entry).is_dir():
            continue
        for program in Path(entry).iterdir():
            link = folder / program.name
            if program.name != hidden and not link.exists() and not link.is_symlink():
                link.symlink_to(program)
    return str(folder)


def run_pytest(tmp_path: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    # No plugins from entry points (Schemathesis, Hypothesis, Playwright): the tests chosen
    # need none, and importing them tripled the time. Its own temporary folder (not this
    # run's, which pytest would empty) and no cache written into the checkout.
    base["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    basetemp = tmp_path / f"inner-{len(list(tmp_path.glob('inner-*')))}"
    return subprocess.run(
        [sys.executable, "-m", "pytest", *SELECTION, "--postgres", "embedded", "-q",
         "-p", "no:cacheprovider", "--basetemp", str(basetemp)],
        cwd=ROOT, env={**base, "PATH": path, **env}, capture_output=True, text=True,
        timeout=180, check=False,
    )


def counts(output: str) -> dict[str, int]:
    summary = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


@pytest.fixture(scope="module")
def no_curl(tmp_path_factory: pytest.TempPathFactory) -> str:
    return path_without(tmp_path_factory.mktemp("no-curl"), "curl")


def test_the_hidden_path_hides_curl_only(no_curl: str) -> None:
    assert tools.TOOLS["curl"].found()  # this machine has it: scripts/test installed it
    env = {**os.environ, "PATH": no_curl}
    done = subprocess.run([sys.executable, "-m", "tests.tools", "curl", "wget"], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split() == ["curl"]


def test_without_curl_its_tests_are_skipped_with_the_reason(no_curl: str,
                                                           tmp_path: Path) -> None:
    done = run_pytest(tmp_path, no_curl)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    found = counts(output)
    assert found.get("passed") == 1, output  # the test that needs no program ran
    assert found.get("skipped", 0) >= 3, output
    assert "failed" not in found and "error" not in found and "errors" not in found, output
    skipped = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == found["skipped"], output
    for line in skipped:
        # Each at its test's own line, with what to install.
        assert re.match(r"SKIPPED \[1\] tests/test_files_http\.py:\d+: curl not installed"
                        r" \(Debian: apt-get install curl;", line), line


def test_without_curl_in_ci_its_tests_fail(no_curl: str, tmp_path: Path) -> None:
    done = run_pytest(tmp_path, no_curl, CI="true")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    found = counts(output)
    assert found.get("passed") == 1, output
    assert "skipped" not in found, output
    assert found.get("errors", found.get("error", 0)) >= 3, output
    assert "curl not installed" in output and "in CI every test must run" in output, output
