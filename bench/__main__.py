"""`python -m bench <name> [args...]` runs bench/<name>.py; `python -m bench` lists them.
`python -m bench all [--quick]` runs the issue's set (round, overhead, accuracy, flower) one after
the other, each as its own process, and says how long each took."""

from __future__ import annotations

import runpy
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ALL = ["round", "overhead", "accuracy", "flower"]


def run_all(extra: list[str]) -> int:
    took, failed = {}, []
    for name in ALL:
        print(f"\n=== python -m bench {name} {' '.join(extra)}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", "bench", name, *extra], cwd=HERE.parent)
        took[name] = time.monotonic() - started
        if code:
            failed.append(f"{name} (exit {code})")
    print("\n" + ", ".join(f"{n} {s:.0f} s" for n, s in took.items()) + f"; all {sum(took.values()):.0f} s")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


def main() -> None:
    names = sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
    if len(sys.argv) >= 2 and sys.argv[1] == "all":
        sys.exit(run_all(sys.argv[2:]))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print("usage: python -m bench <name> [args...] | python -m bench all [--quick]\nbenchmarks: "
              + ", ".join(names))
        sys.exit(0 if len(sys.argv) < 2 else 2)
    name = sys.argv[1]
    sys.argv = [str(HERE / f"{name}.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
