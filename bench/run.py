"""Entry point: every benchmark in one run, written to benchmarks.md with its charts."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import exports, files, startup
from bench.database import database
from bench.harness import Plan, Section, machine, now_utc


def log(message: str) -> None:
    print(message, flush=True)


def headline(plan: Plan, sections: list[Section]) -> Section:
    """The ratios that matter, gathered from every section; the headline of
    docs/benchmarks.md is this text (the README links there)."""
    section = Section("Headline")
    if plan.quick:
        section.add("**Quick run** (`--quick`): small data, two rounds. It checks that the "
                    "harness works; its numbers are not the headline.", "")
    section.add(*(f"- {line}" for s in sections for line in s.headline), "",
                f"Measured with `./scripts/bench` side by side in one run ({machine_short()}); "
                "details, spreads and charts below.")
    return section


def machine_short() -> str:
    import os

    import psutil

    return f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"


# Sections measured by their own commands (bench.listing, bench.http_guard, ...) and the
# notes on missed targets live below this line; a run rewrites only what is above it.
KEEP_MARKER = "<!-- kept: ./scripts/bench rewrites the sections above and keeps everything" \
    " below this line -->"


def kept_sections(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(KEEP_MARKER)
    return "" if at < 0 else text[at:]


def write_report(plan: Plan, command: str, sections: list[Section], seconds: float) -> Path:
    plan.out.mkdir(parents=True, exist_ok=True)
    path = plan.out / "benchmarks.md"
    kept = kept_sections(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
    kind = "a quick run: small data, not the headline" if plan.quick else "the full run"
    text = "\n".join([
        "# Benchmarks",
        "",
        f"Produced by `{command}` ({kind}) on {now_utc()}, in {seconds / 60:.1f} minutes.",
        "",
        f"Machine: {machine()}. Loopback only; the machine is shared, so each contender "
        "was run several times, interleaved with the others, and the tables give the "
        "median and the spread (min–max).",
        "",
        *(s.markdown() for s in sections),
        kept,
    ])
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small data, 2 rounds, output under var/bench-quick/")
    parser.add_argument("--out", type=Path, help="folder for benchmarks.md and the charts")
    parser.add_argument("--work", type=Path,
                        help="folder for the data kept between runs (database, big file); "
                        "default var/bench/ or var/bench-quick/")
    parser.add_argument("--only", choices=["exports", "files", "startup"], action="append",
                        help="run only these benchmarks (repeatable)")
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick, args.out, args.work)
    only = set(args.only or ["exports", "files", "startup"])
    command = "./scripts/bench" + (" --quick" if plan.quick else "")
    started = time.monotonic()
    log(f"machine: {machine()}")
    sections: list[Section] = []
    first_byte: list[str] = []
    with database(plan, log) as url:
        if "exports" in only:
            found, first_byte = exports.run(plan, url, log)
            sections += found
        if "files" in only:
            sections += files.run(plan, url, log)
        if "startup" in only:
            sections += startup.run(plan, url, first_byte, log)
    sections.insert(0, headline(plan, sections))
    path = write_report(plan, command, sections, time.monotonic() - started)
    log(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
