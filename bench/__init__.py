"""Benchmarks of exporter against the physical limit (psql, nginx) and what users would
use instead. Run with `./scripts/bench` (full) or `./scripts/bench --quick`."""
