"""Leader memory of a `mean` round with large models: the peak RSS of the round's leader SL process
above its size at rest just before the round, for 8 peers x 40 MB (the issue's figure: at most 3 x 40 MB).

The peak is the kernel's high-water mark (VmHWM), reset just before each measured round by writing 5 to
/proc/<pid>/clear_refs (root, or the SLs' own user); "at rest" is VmRSS at that moment, after warm-up
rounds, so the blobs the SL keeps between rounds count in it, and what one round adds is measured.

    python -m bench memory [--peers 8] [--mb 40] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import write_figures  # noqa: E402
from bench._swarm import LocalSwarm  # noqa: E402
from bench.round import payload, run_rounds  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def measure(peers: int, mb: float, rounds: int) -> dict:
    nodes = [f"node{i + 1}" for i in range(peers)]
    swarm = LocalSwarm()
    try:
        channels = swarm.start_peers(nodes, max(1, min(peers - 1, 16)))
        blobs = {n: payload(mb, i) for i, n in enumerate(nodes)}
        warm_up = run_rounds(channels, blobs, 2)  # the blobs an SL keeps between rounds are in place
        pids = {n: swarm.sls[n].popen.pid for n in nodes}
        cells = []
        led = {swarm.round_record(w["round"]).leader for w in warm_up}
        for _ in range(rounds):
            rest = {}
            for n, pid in pids.items():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
                rest[n] = status_kb(pid, "VmRSS")
            number = run_rounds(channels, blobs, 1)[0]["round"]
            leader = swarm.round_record(number).leader
            peak = status_kb(pids[leader], "VmHWM")
            # A node's first round as leader also opens its channels to every peer (their buffers
            # stay with it): marked, since it is the larger figure.
            first = leader not in led
            led.add(leader)
            load = os.getloadavg()[0]
            cells.append({"round": number, "leader": leader, "first_lead": first, "rest_mb": rest[leader] / 1024,
                          "peak_mb": peak / 1024, "above_rest_mb": (peak - rest[leader]) / 1024, "load": load})
            print(f"  round {number}: leader {leader}{' (its first lead)' if first else ''} at rest "
                  f"{rest[leader] / 1024:.0f} MB, peak {peak / 1024:.0f} MB: {(peak - rest[leader]) / 1024:.0f} MB "
                  f"above rest (load {load:.1f})", flush=True)
        return {"peers": peers, "mb": mb, "rounds": cells,
                "max_above_rest_mb": max(c["above_rest_mb"] for c in cells),
                "model_mb": len(blobs[nodes[0]]) / 2**20}
    finally:
        swarm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--mb", type=float, default=40.0, help="payload per peer in MB")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after 2 warm-up rounds")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 peers x 8 MB, 1 round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.peers, args.mb, args.rounds = 4, 8.0, 1
    args.out = args.out or RESULTS / ("memory-quick.json" if args.quick else "memory.json")
    report = measure(args.peers, args.mb, args.rounds)
    ratio = report["max_above_rest_mb"] / report["model_mb"]
    report["models_above_rest"] = ratio
    print(f"{args.peers} peers x {args.mb:g} MB mean: leader peak {report['max_above_rest_mb']:.0f} MB above rest "
          f"= {ratio:.2f} models (target: at most 3)")
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
