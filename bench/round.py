"""Sync-round latency and scale on loopback: from the last check-in of a round to every peer holding
the verified merged model, for several peer counts and payload sizes, next to the loopback gRPC mTLS
bandwidth measured in the same run; plus the leader-failover recovery time.

Placement: every peer is its own `swarm sl` process (mutual TLS on 127.0.0.1); the ML side is a light
stand-in (random float32 tensors, no training, one thread per peer in this process) so that only the
swarm is measured. Each peer count gets a fresh SN and fresh SLs.

    python -m bench round [--peers 3,8,16,32] [--sizes 0.3,1.2,40,420] [--rounds 20] [--failover] [--quick]
                          [--ledger sqlite|etcd]

--ledger etcd puts the SN's ledger on a three-member etcd cluster on 127.0.0.1 (bench/etcd.py compares
the two side by side).

Cells whose blobs would not fit in memory on a 24 GiB machine (peers x payload over 1.3 GB, held
about 4 times over) are skipped and listed.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import write_figures  # noqa: E402
from bench._swarm import LEDGERS, LocalSwarm  # noqa: E402
from swarmlearn.callback.core import SLChannel  # noqa: E402
from swarmlearn.ledger.sqlite_store import SQLiteStore  # noqa: E402
from swarmlearn.ledger.store import LedgerStore  # noqa: E402
from swarmlearn.ledger.model import leader_order  # noqa: E402
from swarmlearn.sl.transport import PeerFetcher  # noqa: E402
from swarmlearn.defaults import DEFAULT_CONTRACT  # noqa: E402
from swarmlearn.tensors import Tensor, encode  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def payload(megabytes: float, seed: int, tensors: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    per = max(1, int(megabytes * 1e6 / 4 / tensors))
    return encode({f"layer{i}.weight": Tensor("F32", rng.standard_normal(per, dtype=np.float32))
                   for i in range(tensors)})


def checkin_times(ledger: LocalSwarm | Path) -> dict[int, float]:
    """Per round, the wall-clock time of its last check-in (from the signed ledger entries) of a
    swarm's ledger, or of a SQLite ledger file."""
    store = ledger.open_ledger() if isinstance(ledger, LocalSwarm) else SQLiteStore(ledger, read_only=True)
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


# Payload sizes (MB) of the issue: MiniLM LoRA, BERT-base LoRA, a mid-size model, BERT-base full.
SIZES = "0.3,1.2,40,420"
PEERS = "3,8,16,32"
# The most payload a cell may carry in all (peers x payload), in MB: each MB is held about 4 times
# (the stand-in's, the SL's check-in, the leader's decoded copy, the merged one), so this keeps a
# cell under about 5 GB on a 24 GiB machine: 420 MB runs with 3 peers, 40 MB with up to 32.
MEMORY_BUDGET_MB = 1300
COPIES = 4
# The default contract's bound on min_peers (ContractLimits.max_min_peers).
MAX_MIN_PEERS = 16


def measure_bandwidth(swarm: LocalSwarm, node: str, digest: str, repeats: int = 5) -> dict:
    """Single-stream fetch throughput of one blob from an SL process into this one, over the same
    gRPC mTLS path the SLs use between each other."""
    fetcher = PeerFetcher(swarm.identity("sl"))
    try:
        address = swarm.ledger_state().nodes[node].address
        size = len(fetcher.fetch(address, digest, 120))  # warm-up: channel and handshake
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fetcher.fetch(address, digest, 120)
            times.append(time.perf_counter() - started)
    finally:
        fetcher.close()
    return {"bytes": size, "seconds": times, "mb_per_s": size / statistics.median(times) / 1e6}


def run_cell(swarm: LocalSwarm, channels: dict[str, SLChannel], mb: float, rounds: int) -> dict:
    nodes = list(channels)
    blobs = {n: payload(mb, i) for i, n in enumerate(nodes)}
    run_rounds(channels, blobs, 2)  # warm-up: first allocation of this size, channels between SLs
    started = time.time()
    results = run_rounds(channels, blobs, rounds)
    wall = time.time() - started
    last_checkin = checkin_times(swarm)
    latencies = [(max(r["received"].values()) - last_checkin[r["round"]]) * 1000 for r in results]
    size = len(blobs[nodes[0]])
    return {"bytes": size, "latency_ms": latencies, "median_ms": statistics.median(latencies),
            "p90_ms": percentile(latencies, 90), "min_ms": min(latencies), "sync_wall_ms": wall / rounds * 1000,
            # the leader pulls every other peer's blob, then every other peer pulls the merged one
            "bytes_moved": 2 * (len(nodes) - 1) * size, "last_round": results[-1]["round"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=PEERS, help="peer counts, comma separated")
    parser.add_argument("--sizes", default=SIZES, help="payload per peer in MB, comma separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--failover", action="store_true", help="also time a leader failover (default timeouts)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 peers, 0.3 and 1.2 MB, 5 rounds")
    parser.add_argument("--ledger", choices=LEDGERS, default="sqlite",
                        help="the SN's ledger: its SQLite file, or a three-member etcd cluster on 127.0.0.1")
    parser.add_argument("--out", type=Path, default=None,
                        help="raw figures (default bench/results/round.json, round-quick.json with --quick, "
                             "round-etcd[-quick].json with --ledger etcd)")
    args = parser.parse_args()
    suffix = ("-etcd" if args.ledger == "etcd" else "") + ("-quick" if args.quick else "")
    args.out = args.out or RESULTS / f"round{suffix}.json"
    if args.quick:
        args.peers, args.sizes, args.rounds = "3", "0.3,1.2", 5
    peer_counts = [int(x) for x in args.peers.split(",")]
    sizes = [float(x) for x in args.sizes.split(",")]
    report: dict = {"rounds": args.rounds, "cpus": os.cpu_count(), "placement": "one SL process per peer, ML "
                    "stand-ins as threads of the benchmark process", "cells": [], "skipped": []}
    if args.ledger != "sqlite":
        report["ledger"] = args.ledger
        print(f"ledger: {args.ledger} (three members on 127.0.0.1, mutual TLS)")
    print(f"peers: one `swarm sl` process each over mTLS on 127.0.0.1; ML stand-ins are threads here; "
          f"{args.rounds} rounds per cell after 2 warm-up rounds")
    header = (f"{'peers':>5} {'payload':>9} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'moved MB':>9} "
              f"{'ideal ms':>9} {'÷ ideal':>8}")
    bandwidth: dict | None = None
    rows = []
    for peers in peer_counts:
        cells = [mb for mb in sizes if peers * mb <= MEMORY_BUDGET_MB]
        report["skipped"] += [{"peers": peers, "mb": mb, "why": f"needs about {peers * mb * COPIES / 1000:.0f} GB"}
                              for mb in sizes if mb not in cells]
        if not cells:
            continue
        nodes = [f"node{i + 1}" for i in range(peers)]
        swarm = LocalSwarm(ledger=args.ledger)
        try:
            # The default contract allows min_peers up to 16; the round closes when every active
            # member is in anyway, so a larger swarm still waits for all of its peers.
            channels = swarm.start_peers(nodes, max(1, min(peers - 1, MAX_MIN_PEERS)))
            for mb in cells:
                cell = run_cell(swarm, channels, mb, args.rounds)
                cell.update(peers=peers, mb=mb)
                if bandwidth is None or (cell["bytes"] > bandwidth["bytes"] and mb <= 40):
                    merged = swarm.round_record(cell["last_round"]).merged_hash
                    bandwidth = measure_bandwidth(swarm, nodes[0], merged)
                report["cells"].append(cell)
                rows.append(cell)
                print(f"  measured {peers} peers x {mb} MB: median {cell['median_ms']:.1f} ms", flush=True)
            if args.failover and peers == 3:
                report["failover"] = failover(swarm, channels, nodes)
        finally:
            swarm.stop()
    report["bandwidth"] = bandwidth
    print(f"\nloopback gRPC mTLS, one stream, SL process -> this process: {bandwidth['mb_per_s']:.0f} MB/s "
          f"(a {bandwidth['bytes'] / 1e6:.1f} MB blob, median of {len(bandwidth['seconds'])})")
    print(header)
    for cell in rows:
        ideal = cell["bytes_moved"] / 1e6 / bandwidth["mb_per_s"] * 1000
        cell["ideal_ms"], cell["ratio_to_ideal"] = ideal, cell["median_ms"] / ideal if ideal else None
        print(f"{cell['peers']:>5} {cell['mb']:>6} MB {cell['median_ms']:>10.1f} {cell['p90_ms']:>8.1f} "
              f"{cell['min_ms']:>8.1f} {cell['bytes_moved'] / 1e6:>9.1f} {ideal:>9.1f} {cell['ratio_to_ideal']:>8.2f}")
    for skip in report["skipped"]:
        print(f"skipped {skip['peers']} peers x {skip['mb']} MB: {skip['why']}")
    print("ideal = bytes moved (leader pulls n-1 blobs, n-1 peers pull the merged one) ÷ measured bandwidth")
    write_figures(args.out, report)
    plot(report, args.out.with_suffix(".png"))


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mb in sorted({c["mb"] for c in report["cells"]}):
        cells = [c for c in report["cells"] if c["mb"] == mb]
        ax.plot([c["peers"] for c in cells], [c["median_ms"] for c in cells], marker="o", label=f"{mb} MB")
    ax.set(xlabel="peers", ylabel="round latency, median (ms)", yscale="log",
           title=f"sync round latency, {report['cpus']} CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def failover(swarm: LocalSwarm, channels: dict[str, SLChannel], nodes: list[str]) -> dict:
    """Freezes the next round's leader right after its check-in, then times close -> merged."""
    store: LedgerStore = swarm.open_ledger()
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
    store.close()
    r = swarm.round_record(current)
    recovery = r.merged_time - r.closed_time
    print(f"leader failover: leader {leader} frozen after its check-in; round {current} closed, re-elected and "
          f"merged {recovery:.2f} s later (default leader timeout 10 s + 1 s grace)")
    return {"round": current, "frozen_leader": leader, "recovery_s": recovery}


if __name__ == "__main__":
    main()
