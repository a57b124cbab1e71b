"""Benchmarks: `python -m bench <name> [args]`; each prints a table and writes bench/results/<name>.json."""
