"""`python -m bench <name> [args...]` runs bench/<name>.py; `python -m bench` lists them.
`python -m bench all [--quick]` runs the issues' set (ALL: those of them present in bench/) one after
the other, each as its own process, and says how long each took; with --quick, whether the whole
smoke run stayed within QUICK_BUDGET_S."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ALL = ["round", "overhead", "accuracy", "flower", "wan", "startup", "query", "memory"]
QUICK_BUDGET_S = 120  # issue 14: `all --quick` must stay a smoke test


def run_all(extra: list[str]) -> int:
    took, failed = {}, []
    present = [name for name in ALL if (HERE / f"{name}.py").exists()]
    for name in present:
        print(f"\n=== python -m bench {name} {' '.join(extra)}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", "bench", name, *extra], cwd=HERE.parent)
        took[name] = time.monotonic() - started
        if code:
            failed.append(f"{name} (exit {code})")
    total = sum(took.values())
    print("\n" + ", ".join(f"{n} {s:.0f} s" for n, s in took.items()) + f"; all {total:.0f} s"
          + (f" (budget {QUICK_BUDGET_S} s: {'met' if total <= QUICK_BUDGET_S else 'missed'}; load average "
             f"{os.getloadavg()[0]:.1f})" if "--quick" in extra else ""))
    if absent := [name for name in ALL if name not in present]:
        print("not in bench/, so not run: " + ", ".join(absent))
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
