"""Sync-round latency on loopback: from the last check-in of a round to every peer holding the
verified merged model, for a few payload sizes; plus the leader-failover recovery time.

Peers are real `swarm sl` processes over mutual TLS; the ML side is a light stand-in (random float32
tensors, no training, one thread per peer in this process) so that only the swarm is measured.

    python -m bench round_latency [--peers 3] [--sizes 0.3,40] [--rounds 20] [--failover]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._swarm import LocalSwarm  # noqa: E402
from swarmlearn.callback.core import SLChannel  # noqa: E402
from swarmlearn.ledger.sqlite_store import SQLiteStore  # noqa: E402
from swarmlearn.ledger.state import leader_order  # noqa: E402
from swarmlearn.sn.server import DEFAULT_CONTRACT  # noqa: E402
from swarmlearn.tensors import Tensor, encode  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def payload(megabytes: float, seed: int, tensors: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    per = max(1, int(megabytes * 1e6 / 4 / tensors))
    return encode({f"layer{i}.weight": Tensor("F32", rng.standard_normal(per, dtype=np.float32))
                   for i in range(tensors)})


def checkin_times(ledger: Path) -> dict[int, float]:
    """Per round, the wall-clock time of its last check-in (from the signed ledger entries)."""
    store = SQLiteStore(ledger, read_only=True)
    try:
        last: dict[int, float] = {}
        for entry in store.read():
            if entry.tx.kind == "checkin":
                r = entry.tx.payload["round"]
                last[r] = max(last.get(r, 0.0), entry.tx.time)
        return last
    finally:
        store.close()


def run_rounds(channels: dict[str, SLChannel], blobs: dict[str, bytes], rounds: int,
               delays: dict[str, float] | None = None) -> list[dict]:
    """All peers sync `rounds` times; returns per round: number and each peer's receive time."""
    received: list[dict] = [{} for _ in range(rounds)]
    numbers: list[int] = [0] * rounds
    barrier = threading.Barrier(len(channels))
    errors: list[BaseException] = []

    def peer(node: str) -> None:
        try:
            for i in range(rounds):
                barrier.wait()
                if delays and node in delays:
                    time.sleep(delays[node])
                header, merged = channels[node].sync(blobs[node], weight=1.0)
                received[i][node] = time.time()
                numbers[i] = header.round
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=peer, args=(n,)) for n in channels]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [{"round": numbers[i], "received": received[i]} for i in range(rounds)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--sizes", default="0.3,40", help="payload per peer in MB, comma separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--failover", action="store_true", help="also time a leader failover (default timeouts)")
    parser.add_argument("--out", type=Path, default=RESULTS / "round_latency.json")
    args = parser.parse_args()

    nodes = [f"node{i + 1}" for i in range(args.peers)]
    swarm = LocalSwarm()
    report: dict = {"peers": args.peers, "rounds": args.rounds, "cpus": os.cpu_count(), "sizes": {}}
    try:
        swarm.start_sn()
        for n in nodes:
            swarm.start_sl(n)
        channels = {n: SLChannel(swarm.sl_addresses[n]) for n in nodes}
        for n in nodes:
            channels[n].join("default", max(1, args.peers - 1), 1.0, "mean")
        print(f"{args.peers} SL processes over mTLS on 127.0.0.1, ML stand-ins as threads; {args.rounds} rounds each")
        print(f"{'payload':>9} {'median ms':>10} {'p90 ms':>8} {'min ms':>7} {'ML sync median ms':>18}")
        for mb in [float(x) for x in args.sizes.split(",")]:
            blobs = {n: payload(mb, i) for i, n in enumerate(nodes)}
            run_rounds(channels, blobs, 2)  # warm-up: channels, first allocation of this size
            started = time.time()
            results = run_rounds(channels, blobs, args.rounds)
            wall = time.time() - started
            last_checkin = checkin_times(swarm.ledger_path)
            latencies = [(max(r["received"].values()) - last_checkin[r["round"]]) * 1000 for r in results]
            per_round_wall = wall / args.rounds * 1000
            report["sizes"][str(mb)] = {"bytes": len(blobs[nodes[0]]), "latency_ms": latencies,
                                        "median_ms": statistics.median(latencies),
                                        "p90_ms": percentile(latencies, 90), "sync_wall_ms": per_round_wall}
            print(f"{mb:>7} MB {statistics.median(latencies):>10.1f} {percentile(latencies, 90):>8.1f} "
                  f"{min(latencies):>7.1f} {per_round_wall:>18.1f}")
        if args.failover:
            report["failover"] = failover(swarm, channels, nodes)
    finally:
        swarm.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"raw figures: {args.out}")


def failover(swarm: LocalSwarm, channels: dict[str, SLChannel], nodes: list[str]) -> dict:
    """Freezes the next round's leader right after its check-in, then times close -> merged."""
    store = SQLiteStore(swarm.ledger_path, read_only=True)
    head = store.head()[0]
    current = max(e.tx.payload["round"] for e in store.read() if e.tx.kind == "merged") + 1
    leader = leader_order(DEFAULT_CONTRACT, 0, current, nodes)[0]
    blobs = {n: payload(0.3, i) for i, n in enumerate(nodes)}
    frozen = threading.Event()

    def freeze_when_checked_in():
        index = head + 1
        while not frozen.is_set():
            for e in store.read(index):
                index = e.index + 1
                if e.tx.kind == "checkin" and e.tx.payload["node"] == leader:
                    os.kill(swarm.sls[leader].popen.pid, signal.SIGSTOP)
                    frozen.set()
                    return
            time.sleep(0.001)

    watcher = threading.Thread(target=freeze_when_checked_in)
    watcher.start()
    others = {n: channels[n] for n in nodes if n != leader}
    threading.Thread(target=lambda: channels[leader].sync(blobs[leader], 1.0), daemon=True).start()
    frozen.wait(30)
    run_rounds(others, blobs, 1)
    watcher.join()
    entries = store.read(head + 1)
    closed = next(e for e in entries if e.tx.kind == "close_round")
    merged = next(e for e in entries if e.tx.kind == "merged")
    store.close()
    recovery = merged.tx.time - closed.tx.time
    print(f"leader failover: leader {leader} frozen after its check-in; round {current} closed, re-elected and "
          f"merged {recovery:.2f} s later (default leader timeout 10 s + 1 s grace)")
    return {"round": current, "frozen_leader": leader, "recovery_s": recovery}


if __name__ == "__main__":
    main()
