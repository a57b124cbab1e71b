"""Swarm overhead, end to end: the flagship model.py on each node's shard with SWARM_LOOPBACK=1
(trains alone, no SL) versus the same three processes in a real swarm (SN + 3 SL processes over
mTLS), same shards, same steps per node, sync every 16 steps.

Both arms run the three ML processes at the same time with one torch thread each, so they share the
2 cores the same way and the only difference is the swarm. Runs come in pairs, one of each arm, the
order alternating from pair to pair (loopback first, then swarm first, ...), so that drift in the
machine's load weighs on both arms alike and each pair's ratio compares runs made side by side.

End to end is one run's wall time: for the swarm arm from starting its SN and SLs to the last ML
process's exit and the swarm stopped; for the loopback arm from starting the ML processes to the last
one's exit. The figure held against the target (≤ 1.02) is the upper end of the 90 % confidence
interval of the swarm ÷ loopback ratio: the pairs' log ratios, mean ± Student's t × standard error,
taken back out of the log (so the ratio is a geometric mean). Per-node training time (the Trainer's
own loop) gets the same treatment.

    python -m bench overhead [--train-per-node 480] [--sync-frequency 16] [--pairs 4] [--quick]

--quick is a smoke run of the same path (two nodes, a few steps, one pair): it proves the path works,
the default makes the figures.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import write_figures  # noqa: E402
from bench._flagship import NODES, run_nodes  # noqa: E402
from swarmlearn.datasets import prepare  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET = 1.02  # swarm ÷ loopback, end to end: the upper end of the 90 % interval
CONFIDENCE = 0.90
# Student's t, 0.95 quantile (a two-sided 90 % interval), by degrees of freedom; beyond the table the
# entry for the largest df at or below is used, which errs on the wide side.
T_95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        15: 1.753, 20: 1.725, 30: 1.697, 60: 1.671}


def student_t(df: int) -> float:
    return T_95[max(k for k in T_95 if k <= df)]


def ratio_interval(ratios: list[float]) -> dict:
    """Geometric mean of paired ratios and its 90 % confidence interval (None with a single pair)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return {"ratios": ratios, "ratio": math.exp(mean), "low": None, "high": None}
    half = student_t(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {"ratios": ratios, "ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half)}


def one_run(work: Path, data: Path, settings: dict[str, str], nodes: list[str], arm: str) -> dict:
    load = os.getloadavg()[0]
    started = time.monotonic()
    metrics = run_nodes(work, data, settings, swarm=arm == "swarm", nodes=nodes)
    wall = time.monotonic() - started
    train = [m["train_seconds"] for m in metrics]
    print(f"  {arm:>8}: end to end {wall:.1f} s, per-node training {', '.join(f'{s:.1f}' for s in train)} s, "
          f"load average {load:.1f}", flush=True)
    return {"wall_s": wall, "train_s": train, "train_median_s": statistics.median(train), "load_average": load,
            "peak_rss_mb": max(m["peak_rss_mb"] for m in metrics), "steps": metrics[0]["steps"],
            "rounds": metrics[0]["rounds"]}


def run_pairs(work: Path, data: Path, pairs: int, settings: dict[str, str], nodes: list[str]) -> list[dict[str, dict]]:
    runs = []
    for i in range(pairs):
        order = ("loopback", "swarm") if i % 2 == 0 else ("swarm", "loopback")
        print(f"pair {i + 1} of {pairs}:", flush=True)
        runs.append({arm: one_run(work / f"pair{i}" / arm, data, settings, nodes, arm) for arm in order})
    return runs


def print_report(report: dict) -> None:
    pairs = report["runs"]
    print(f"\n{report['nodes']} ML processes at once, 1 torch thread each, {report['train_per_node']} rows per "
          f"node, sync every {report['sync_frequency']} steps, {len(pairs)} pair(s), order alternating; "
          f"{report['cpus']} CPUs")
    print(f"{'pair':>4} {'loopback s':>11} {'swarm s':>8} {'ratio':>6} {'train ratio':>12} {'load avg':>9}")
    for i, pair in enumerate(pairs):
        loop, swarm = pair["loopback"], pair["swarm"]
        print(f"{i + 1:>4} {loop['wall_s']:>11.1f} {swarm['wall_s']:>8.1f} {swarm['wall_s'] / loop['wall_s']:>6.3f} "
              f"{swarm['train_median_s'] / loop['train_median_s']:>12.3f} "
              f"{(loop['load_average'] + swarm['load_average']) / 2:>9.1f}")
    for name, key in (("end to end", "end_to_end"), ("per-node training", "training")):
        ci = report[key]
        interval = (f"90 % CI {ci['low']:.3f}-{ci['high']:.3f}" if ci["high"] is not None
                    else "no interval from one pair")
        print(f"swarm ÷ loopback, {name}: {ci['ratio']:.3f} ({interval})")
    verdict = report["target_met"]
    print(f"target: upper end ≤ {TARGET}: " + ("met" if verdict else "missed" if verdict is False else
                                               "not judged (one pair: no interval)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-node", type=int, default=480)
    parser.add_argument("--sync-frequency", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4, help="pairs of runs, one of each arm (default 4)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 pair (so no interval), 2 nodes x 32 rows (2 steps, synced every 2), "
                             "16 test rows, sequences cut at 32 tokens")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="raw figures (default bench/results/overhead.json, overhead-quick.json with --quick)")
    args = parser.parse_args()
    args.out = args.out or RESULTS / f"overhead{'-quick' if args.quick else ''}.json"
    nodes, test_size, settings = NODES, 64, {"SYNC_FREQUENCY": str(args.sync_frequency)}
    if args.quick:  # proves the path end to end; start-up, not training, is most of its time
        args.train_per_node, args.sync_frequency, args.pairs = 32, 2, 1
        nodes, test_size = NODES[:2], 16
        settings = {"SYNC_FREQUENCY": "2", "MIN_PEERS": "2", "MAX_LENGTH": "32"}
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: give 1 or more")
    work = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"swarm-overhead-{os.getpid()}"
    data = work / "data"
    # The test set only feeds the before/after evaluation, which both arms do alike.
    prepare(data, nodes=len(nodes), train_per_node=args.train_per_node, test_size=test_size, seed=42)
    runs = run_pairs(work, data, args.pairs, settings, nodes)
    if args.workdir is None:  # a folder of our own, kept only when a run failed (its logs say why)
        shutil.rmtree(work, ignore_errors=True)
    end_to_end = ratio_interval([p["swarm"]["wall_s"] / p["loopback"]["wall_s"] for p in runs])
    report = {"nodes": len(nodes), "train_per_node": args.train_per_node, "sync_frequency": args.sync_frequency,
              "pairs": args.pairs, "settings": settings,
              "cpus": os.cpu_count(), "confidence": CONFIDENCE, "target": TARGET, "runs": runs,
              "end_to_end": end_to_end,
              "training": ratio_interval([p["swarm"]["train_median_s"] / p["loopback"]["train_median_s"]
                                          for p in runs]),
              "target_met": None if end_to_end["high"] is None else end_to_end["high"] <= TARGET}
    print_report(report)
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
