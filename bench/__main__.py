"""`python -m bench <name> [args...]` runs bench/<name>.py; `python -m bench` lists them."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    names = sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print("usage: python -m bench <name> [args...]\nbenchmarks: " + ", ".join(names))
        sys.exit(0 if len(sys.argv) < 2 else 2)
    name = sys.argv[1]
    sys.argv = [str(HERE / f"{name}.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
