"""`python -m bench <name> [args...]` runs bench/<name>.py; `python -m bench` lists them.
`python -m bench all [--quick]` runs the issues' set (ALL: those of them present in bench/) one after
the other, each as its own process, and says how long each took (wall and CPU seconds: on a machine
shared with other work the CPU time tells what the wall time would be idle); with --quick, whether the
whole smoke run stayed within QUICK_BUDGET_S. Flower's own venv is built first when missing (once; its
build is said plainly and not counted in the budget: it is installation, not the benchmark)."""

from __future__ import annotations

import os
import resource
import runpy
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ALL = ["round", "overhead", "accuracy", "flower", "wan", "startup", "query", "memory"]
QUICK_BUDGET_S = 120  # issue 14: `all --quick` must stay a smoke test
FLOWER_VENV_BUILT = HERE / "flower" / ".venv" / ".installed"  # bench/flower/setup.sh's last step


def children_cpu_s() -> float:
    """CPU seconds of every descendant process reaped so far (their parents waited for them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def prepare_flower() -> None:
    """Flower's venv, built once before the clock starts (bench/flower.py builds it the same way)."""
    if FLOWER_VENV_BUILT.exists():
        return
    print("\n=== python -m bench flower --prepare: Flower's venv, first use (NOT counted in the times below)",
          flush=True)
    started = time.monotonic()
    subprocess.call([sys.executable, "-m", "bench", "flower", "--prepare"], cwd=HERE.parent)
    print(f"Flower's venv: {time.monotonic() - started:.0f} s, outside the benchmark times and the budget", flush=True)


def run_all(extra: list[str]) -> int:
    took, cpu, failed = {}, {}, []
    present = [name for name in ALL if (HERE / f"{name}.py").exists()]
    if "flower" in present:
        prepare_flower()
    loads = [os.getloadavg()[0]]
    for name in present:
        print(f"\n=== python -m bench {name} {' '.join(extra)}", flush=True)
        started, cpu_before = time.monotonic(), children_cpu_s()
        code = subprocess.call([sys.executable, "-m", "bench", name, *extra], cwd=HERE.parent)
        took[name], cpu[name] = time.monotonic() - started, children_cpu_s() - cpu_before
        loads.append(os.getloadavg()[0])
        if code:
            failed.append(f"{name} (exit {code})")
    total = sum(took.values())
    print("\n" + ", ".join(f"{n} {s:.0f} s (cpu {cpu[n]:.0f} s)" for n, s in took.items())
          + f"; all {total:.0f} s, cpu {sum(cpu.values()):.0f} s on {os.cpu_count()} CPUs; 1-min load average "
          f"{min(loads):.1f}-{max(loads):.1f}"
          + (f" (budget {QUICK_BUDGET_S} s: {'met' if total <= QUICK_BUDGET_S else 'missed'})"
             if "--quick" in extra else ""))
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
