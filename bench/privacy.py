"""Accuracy of the flagship (MiniLM + LoRA, model.py unchanged) in a swarm of three nodes with
record-level differential privacy (DP-SGD with Opacus, DP_EPSILON) at several budgets ε, against
the same swarm without DP. Every arm is an SN + 3 SL processes over mTLS on 127.0.0.1 and three
model.py processes (1 torch thread each), on the same IID split; ε is what each node spent at δ,
as its accountant reports it.

    python -m bench privacy [--train-per-node 2000] [--test-size 500] [--epsilons none,8,4,1] [--epochs 1]
                            [--batch-size 256] [--lr 1e-2] [--clip 1.0] [--sync-frequency 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import write_figures  # noqa: E402
from bench._flagship import run_nodes  # noqa: E402
from swarmlearn.datasets import prepare  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# DP-SGD's noise on the mean gradient is z·C/B per coordinate, so the defaults take big expected batches
# (256) over 2000 rows per node for one epoch (8 steps) at lr 1e-2, merging every 4 steps; the accuracy
# bench's batch 16 over 800 rows (z·C·√d/B ≈ 10 C at ε = 8) left every DP arm at the majority class.
# Shorter sequences, and the merged model measured once, at the end, so that CPU goes to training.
SETTINGS = {"LEARNING_RATE": "1e-2", "SYNC_FREQUENCY": "4", "BATCH_SIZE": "256", "MAX_LENGTH": "64",
            "EVAL_EVERY": "1000", "DP_DELTA": "1e-5", "DP_MAX_GRAD_NORM": "1.0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-node", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epsilons", default="none,8,4,1",
                        help="arms to run, in order: budgets ε, and 'none' for the same swarm without DP")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over each node's shard")
    parser.add_argument("--batch-size", type=int, default=int(SETTINGS["BATCH_SIZE"]),
                        help="(expected) batch size of every arm")
    parser.add_argument("--lr", default=SETTINGS["LEARNING_RATE"], help="learning rate of every arm")
    parser.add_argument("--sync-frequency", default=SETTINGS["SYNC_FREQUENCY"], help="merge every so many steps")
    parser.add_argument("--clip", default=SETTINGS["DP_MAX_GRAD_NORM"], help="per-sample gradient clip of the DP arms")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = parser.parse_args()
    # Stopped with SIGTERM, the arm's SN, SLs and model.py processes are stopped too (run_nodes' finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"swarm-privacy-{os.getpid()}"
    data = work / "data"
    prepare(data, nodes=3, train_per_node=args.train_per_node, test_size=args.test_size, seed=42)
    settings = {**SETTINGS, "MAX_EPOCHS": f"{args.epochs:g}", "BATCH_SIZE": str(args.batch_size),
                "LEARNING_RATE": args.lr, "DP_MAX_GRAD_NORM": args.clip, "SYNC_FREQUENCY": args.sync_frequency}
    report: dict = {"train_per_node": args.train_per_node, "test_size": args.test_size, "settings": settings,
                    "cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "rows": []}
    arms = [("no DP", None) if e == "none" else (f"DP ε={e}", float(e)) for e in args.epsilons.split(",") if e]
    for label, epsilon in arms:
        extra = {} if epsilon is None else {"DP_EPSILON": f"{epsilon:g}"}
        started = time.time()
        metrics = run_nodes(work / label.replace(" ", "-").replace("=", ""), data, {**settings, **extra}, swarm=True)
        seconds = time.time() - started
        spent = [m["privacy"]["epsilon"] for m in metrics if "privacy" in m]
        row = {"arm": label, "target_epsilon": epsilon, "accuracy": metrics[0]["after"]["accuracy"],
               "f1": metrics[0]["after"]["f1"], "spent_epsilon": max(spent) if spent else None,
               "noise_multiplier": metrics[0].get("privacy", {}).get("noise_multiplier"),
               "steps": metrics[0]["steps"], "rounds": metrics[0]["rounds"], "wall_s": seconds,
               "same_model_on_every_node": len({m["after"]["accuracy"] for m in metrics}) == 1}
        report["rows"].append(row)
        write_figures(args.out, report)  # so far, in case a later arm fails
        print(f"  {label}: accuracy {row['accuracy']:.3f}" + ("" if epsilon is None else
              f", ε spent {row['spent_epsilon']:.2f} (noise multiplier {row['noise_multiplier']:.2f})")
              + f" ({seconds:.0f} s)", flush=True)
    report["load_after"] = os.getloadavg()[0]
    print(f"\n3 nodes x {args.train_per_node} training rows (IID), {args.test_size} test rows, {args.epochs:g} epochs, "
          f"lr {settings['LEARNING_RATE']}, batch {settings['BATCH_SIZE']}, merge every {settings['SYNC_FREQUENCY']} "
          f"steps; δ={settings['DP_DELTA']}, clip {settings['DP_MAX_GRAD_NORM']}")
    print(f"{'arm':>10} {'accuracy':>9} {'F1':>6} {'ε spent':>8} {'noise z':>8} {'steps':>6} {'wall s':>7}")
    for r in report["rows"]:
        eps = "-" if r["spent_epsilon"] is None else f"{r['spent_epsilon']:.2f}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        print(f"{r['arm']:>10} {r['accuracy']:>9.3f} {r['f1']:>6.3f} {eps:>8} {z:>8} {r['steps']:>6} "
              f"{r['wall_s']:>7.0f}")
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
