"""Swarm overhead on training: the flagship model.py on each node's shard with SWARM_LOOPBACK=1
(trains alone, no SL) versus the same three nodes in a real swarm (SN + 3 SL processes over mTLS),
same shards, same steps per node, sync every 16 steps.

Both arms run the three ML processes at the same time with one torch thread each, so they share the
2 cores the same way and the only difference is the swarm. Arms alternate (loopback, swarm,
loopback, swarm ...) so that drift in machine load hits both.

    python -m bench overhead [--train-per-node 480] [--sync-frequency 16] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import write_figures  # noqa: E402
from bench._flagship import run_nodes  # noqa: E402
from swarmlearn.datasets import prepare  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-node", type=int, default=480)
    parser.add_argument("--sync-frequency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--quick", action="store_true", help="smoke run: 96 rows per node, sync every 2, 1 repeat")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="raw figures (default bench/results/overhead.json, overhead-quick.json with --quick)")
    args = parser.parse_args()
    args.out = args.out or RESULTS / f"overhead{'-quick' if args.quick else ''}.json"
    if args.quick:
        args.train_per_node, args.sync_frequency, args.repeats = 96, 2, 1
    work = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"swarm-overhead-{os.getpid()}"
    data = work / "data"
    # The test set only feeds the before/after evaluation, which is outside the timed training.
    prepare(data, nodes=3, train_per_node=args.train_per_node, test_size=64, seed=42)

    runs: dict[str, list[list[dict]]] = {"loopback": [], "swarm": []}
    for i in range(args.repeats):
        for arm in ("loopback", "swarm"):
            started = time.time()
            metrics = run_nodes(work / f"run{i}" / arm, data, {"SYNC_FREQUENCY": str(args.sync_frequency)},
                                swarm=arm == "swarm")
            runs[arm].append(metrics)
            seconds = ", ".join(f"{m['train_seconds']:.1f}" for m in metrics)
            print(f"  {arm} run {i + 1}: per-node training {seconds} s ({time.time() - started:.0f} s with start-up)",
                  flush=True)

    def summary(arm: str) -> dict:
        seconds = [m["train_seconds"] for run in runs[arm] for m in run]
        rss = [m["peak_rss_mb"] for run in runs[arm] for m in run]
        return {"train_seconds": seconds, "median_s": statistics.median(seconds), "min_s": min(seconds),
                "max_s": max(seconds), "peak_rss_mb": max(rss), "steps": runs[arm][0][0]["steps"],
                "rounds": runs[arm][0][0]["rounds"]}

    report = {"train_per_node": args.train_per_node, "sync_frequency": args.sync_frequency,
              "repeats": args.repeats, "cpus": os.cpu_count(), "loopback": summary("loopback"),
              "swarm": summary("swarm")}
    loop, swarm = report["loopback"], report["swarm"]
    report["ratio"] = swarm["median_s"] / loop["median_s"]
    print(f"\n3 ML processes at once, 1 torch thread each, {args.train_per_node} rows per node, "
          f"sync every {args.sync_frequency} steps, {args.repeats} run(s) per arm")
    print(f"{'arm':>9} {'steps/node':>10} {'rounds':>7} {'train s median':>15} {'range':>15} {'ML peak RSS MB':>15}")
    for arm, s in (("loopback", loop), ("swarm", swarm)):
        print(f"{arm:>9} {s['steps']:>10} {s['rounds']:>7} {s['median_s']:>15.1f} "
              f"{s['min_s']:>7.1f}-{s['max_s']:<7.1f} {s['peak_rss_mb']:>15.0f}")
    print(f"swarm ÷ loopback training wall time: {report['ratio']:.3f} (target ≤ 1.05)")
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
