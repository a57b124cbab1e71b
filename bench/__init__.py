"""Benchmarks: `python -m bench <name> [args]`; each prints a table and writes bench/results/<name>.json."""

import json
from pathlib import Path


def write_figures(path: Path, report: dict) -> None:
    """Writes a benchmark's raw figures as JSON (bench/results/<name>.json) and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"raw figures: {path}")
