"""Private, robust and LoRA-correct merging on the flagship, side by side: accuracy and what each costs.

Arms, on the same data and settings (3 nodes, real processes: SN + 3 SLs over mTLS + 3 model.py):
`mean`; `secure_mean` (the leader sees masked inputs only); `lora_exact` (the mean of B·A, re-factored);
`mean` with record-level DP-SGD at ε ≈ 8 (DP_EPSILON, Opacus); and `secure_mean` with it.

Per arm: each node's final accuracy (and their mean), rounds, the median round time from close to merged
model (the ledger's entries, signed by the nodes' clocks: the merge's own cost, not training), and the bytes
of a round: contributions as they travel between SLs (plain tensors, or masked inputs of 8 bytes a value),
the merged model to every participant, and the round's ledger entries (check-ins, shares, reveals...).

    python -m bench merging [--train-per-node 400] [--test-size 400] [--arms mean,secure_mean,...] [--quick]
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
from bench._flagship import NODES, run_nodes  # noqa: E402
from swarmlearn.datasets import prepare  # noqa: E402
from swarmlearn.ledger.sqlite_store import SQLiteStore  # noqa: E402
from swarmlearn.ledger.state import fold  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"LEARNING_RATE": "3e-3", "SYNC_FREQUENCY": "8", "MAX_EPOCHS": "1", "BATCH_SIZE": "16", "EVAL_EVERY": "100"}
ARMS = {"mean": {"MERGE_METHOD": "mean"},
        "secure_mean": {"MERGE_METHOD": "secure_mean"},
        "lora_exact": {"MERGE_METHOD": "lora_exact"},
        "mean + DP ε≈8": {"MERGE_METHOD": "mean", "DP_EPSILON": "8"},
        "secure_mean + DP ε≈8": {"MERGE_METHOD": "secure_mean", "DP_EPSILON": "8"}}
ROUND_KINDS = ("checkin", "close_round", "reelect", "merged", "round_abort", "secagg_shares", "secagg_masking",
               "secagg_masked", "secagg_survivors", "secagg_reveal")


def round_costs(ledger_db: Path) -> dict:
    """From a finished run's ledger: per merged round, seconds from close to merged and bytes moved."""
    store = SQLiteStore(ledger_db, read_only=True)
    try:
        entries = list(store.read())
    finally:
        store.close()
    state = fold(entries)
    contract = state.contract("default")
    ledger_bytes: dict[int, int] = {}
    for e in entries:
        if e.tx.kind in ROUND_KINDS and e.tx.payload.get("contract") == contract.name:
            number = e.tx.payload["round"]
            ledger_bytes[number] = ledger_bytes.get(number, 0) + len(e.body_bytes())
    seconds, moved, ledger = [], [], []
    # Entries of every round (the state keeps the newest rounds only; a run of this size keeps all).
    for number, r in contract.rounds.items():
        if r.status != "merged" or r.closed_time <= 0:
            continue
        seconds.append(r.merged_time - r.closed_time)
        if r.secure is not None:
            contributions = sum(r.secure.masked_sizes.get(n, 0) for n in r.participants if n != r.leader)
        else:
            contributions = sum(r.checkins[n].size for n in r.participants if n != r.leader)
        moved.append(contributions + r.merged_size * (len(r.participants) - 1))
        ledger.append(ledger_bytes.get(number, 0))
    return {"rounds": len(seconds), "median_round_s": statistics.median(seconds) if seconds else None,
            "median_model_bytes": statistics.median(moved) if moved else None,
            "median_ledger_bytes": statistics.median(ledger) if ledger else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-node", type=int, default=400)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma separated, of: {', '.join(ARMS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 48 rows per node, sync every 2 steps")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}; arms: {', '.join(ARMS)}")
    settings = dict(SETTINGS)
    if args.quick:
        args.train_per_node, args.test_size = 48, 48
        settings.update({"SYNC_FREQUENCY": "2", "MAX_LENGTH": "32"})
    args.out = args.out or RESULTS / f"merging{'-quick' if args.quick else ''}.json"
    work = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"swarm-merging-{os.getpid()}"
    data = work / "data"
    if not (data / "test_data.csv").is_file():
        prepare(data, nodes=len(NODES), train_per_node=args.train_per_node, test_size=args.test_size, seed=42)
    report: dict = {"train_per_node": args.train_per_node, "test_size": args.test_size, "settings": settings,
                    "cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "arms": {}}
    for arm in arms:
        out = work / arm.replace(" ", "-").replace("≈", "")
        started = time.time()
        metrics = run_nodes(out, data, {**settings, **ARMS[arm]}, swarm=True)
        costs = round_costs(out / "swarm" / "sn" / "ledger.db")
        accuracies = [m["after"]["accuracy"] for m in metrics]
        report["arms"][arm] = {"accuracy": accuracies, "mean_accuracy": statistics.mean(accuracies), **costs,
                               "epsilon": [m.get("privacy", {}).get("epsilon") for m in metrics],
                               "wall_s": time.time() - started}
        write_figures(args.out, report)
        print(f"  {arm}: accuracy {', '.join(f'{a:.3f}' for a in accuracies)}; {costs['rounds']} rounds, "
              f"median {costs['median_round_s']:.3f} s close->merged ({time.time() - started:.0f} s)", flush=True)
    base = report["arms"].get("mean")
    print(f"\n{args.train_per_node} training rows per node ({len(NODES)} nodes), {args.test_size} test rows, "
          f"sync every {settings['SYNC_FREQUENCY']} steps, 1 epoch; load average before {report['load_before']:.2f}")
    print(f"{'arm':>22} {'accuracy':>9} {'rounds':>7} {'round s':>8} {'x mean':>7} {'model MB':>9} {'x mean':>7} "
          f"{'ledger kB':>10} {'ε':>6}")
    for arm, row in report["arms"].items():
        ratio_s = row["median_round_s"] / base["median_round_s"] if base and base["median_round_s"] else float("nan")
        ratio_b = row["median_model_bytes"] / base["median_model_bytes"] if base and base["median_model_bytes"] \
            else float("nan")
        eps = [e for e in row["epsilon"] if e is not None]
        print(f"{arm:>22} {row['mean_accuracy']:>9.3f} {row['rounds']:>7} {row['median_round_s']:>8.3f} "
              f"{ratio_s:>7.2f} {row['median_model_bytes'] / 1e6:>9.2f} {ratio_b:>7.2f} "
              f"{row['median_ledger_bytes'] / 1e3:>10.1f} {max(eps) if eps else float('nan'):>6.2f}")


if __name__ == "__main__":
    main()
