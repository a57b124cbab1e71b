"""Soak: many rounds with several peers and a small model, watching for drift. Reports, first
quarter of the rounds against the last: round latency, RSS and open file descriptors of the SN and
of every SL process, ledger file growth per round, and how long `verify` of the whole ledger takes;
and how far each SL's RSS grew from before the first round, next to what its blob store may keep
(BlobStore.max_blobs blobs, within its byte budget, of this payload's size).

Every peer sends new random tensors (same names and shapes) every round, as a training peer would:
a payload sent twice has the same hash, and an SL stores it once, so a soak that repeated its payload
would never show an SL keeping old rounds' blobs.

    python -m bench soak [--peers 8] [--rounds 200] [--mb 0.3]
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
from bench._swarm import LocalSwarm  # noqa: E402
from bench.round import checkin_times, payload, run_rounds  # noqa: E402
from swarmlearn.ledger.chain import verify_store  # noqa: E402
from swarmlearn.ledger.sqlite_store import SQLiteStore  # noqa: E402
from swarmlearn.sl.transport import BlobStore  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ledger_bytes(path: Path) -> int:
    """The bytes of every stored entry (body and hash): what the ledger holds, independent of when
    SQLite checkpoints its write-ahead log into the file."""
    store = SQLiteStore(path, read_only=True)
    try:
        return sum(len(e.body) + len(e.hash) for e in store.read_raw(0))
    finally:
        store.close()


def fresh_payloads(nodes: list[str], mb: float, round_index: int) -> dict[str, bytes]:
    """This round's payload of every peer: new values, the same tensors, so a new hash each round."""
    return {n: payload(mb, round_index * len(nodes) + i) for i, n in enumerate(nodes)}


def soak(peers: int, rounds: int, mb: float = 0.3, sample_every: int = 5, out=print) -> dict:
    nodes = [f"node{i + 1}" for i in range(peers)]
    swarm = LocalSwarm()
    samples: list[dict] = []
    try:
        channels = swarm.start_peers(nodes, max(1, peers - 1))
        pids = {"sn": swarm.processes[0].popen.pid, **{n: swarm.sls[n].popen.pid for n in nodes}}
        before = {k: rss_mb(pid) for k, pid in pids.items()}
        blob_mb = len(payload(mb, 0)) / 1e6
        done = 0
        started = time.time()
        while done < rounds:
            batch = min(sample_every, rounds - done)
            results = [r for i in range(done, done + batch)
                       for r in run_rounds(channels, fresh_payloads(nodes, mb, i), 1)]
            done += batch
            last = checkin_times(swarm.ledger_path)
            samples.append({
                "round": done,
                "latency_ms": [(max(r["received"].values()) - last[r["round"]]) * 1000 for r in results],
                "rss_mb": {k: rss_mb(pid) for k, pid in pids.items()},
                "fds": {k: open_fds(pid) for k, pid in pids.items()},
                "ledger_bytes": ledger_bytes(swarm.ledger_path),
            })
            if done % 50 == 0 or done == rounds:
                out(f"  {done} rounds, {time.time() - started:.0f} s: latency median "
                    f"{statistics.median(samples[-1]['latency_ms']):.1f} ms, SN RSS {samples[-1]['rss_mb']['sn']:.0f} MB, "
                    f"ledger {samples[-1]['ledger_bytes'] / 1e6:.2f} MB")
        for c in channels.values():
            c.close()
        store = SQLiteStore(swarm.ledger_path, read_only=True)
        try:
            entries = store.head()[0] + 1
            t = time.perf_counter()
            verify_store(store)
            verify_s = time.perf_counter() - t
        finally:
            store.close()
        file_bytes = sum(p.stat().st_size for p in swarm.ledger_path.parent.glob("ledger.db*"))
    finally:
        swarm.stop()
    report = summarize(samples, peers, rounds, mb, entries, verify_s, file_bytes)
    report["blobs"] = blob_retention(samples, before, nodes, blob_mb)
    return report


def blob_retention(samples: list[dict], before: dict[str, float], nodes: list[str], blob_mb: float) -> dict:
    """How far the SLs' RSS grew over the whole soak and over its second half, next to the blob
    store's capacity: once the store is full, an SL that drops old blobs stops growing."""
    middle = next(s for s in samples if s["round"] >= samples[-1]["round"] / 2)
    last = samples[-1]["rss_mb"]
    store = BlobStore()
    return {"blob_mb": blob_mb, "store_capacity": store.max_blobs, "store_budget_mb": store.budget / 2**20,
            "rounds_second_half": samples[-1]["round"] - middle["round"],
            "sl_rss_growth_mb": max(last[n] - before[n] for n in nodes),
            "sl_rss_growth_second_half_mb": max(last[n] - middle["rss_mb"][n] for n in nodes)}


def summarize(samples: list[dict], peers: int, rounds: int, mb: float, entries: int, verify_s: float,
              file_bytes: int) -> dict:
    quarter = max(1, len(samples) // 4)
    first, last = samples[:quarter], samples[-quarter:]

    def latency(part):
        return statistics.median([x for s in part for x in s["latency_ms"]])

    def worst(part, key, who):
        return max(s[key][k] for s in part for k in s[key] if who(k))

    sl = lambda k: k != "sn"  # noqa: E731
    sn = lambda k: k == "sn"  # noqa: E731
    growth = [(b["ledger_bytes"] - a["ledger_bytes"]) / (b["round"] - a["round"])
              for a, b in zip(samples, samples[1:])]
    return {
        "peers": peers, "rounds": rounds, "mb": mb, "entries": entries, "verify_s": verify_s,
        "latency_ms": {"first_quarter": latency(first), "last_quarter": latency(last)},
        "sn_rss_mb": {"first_quarter": worst(first, "rss_mb", sn), "last_quarter": worst(last, "rss_mb", sn)},
        "sl_rss_mb": {"first_quarter": worst(first, "rss_mb", sl), "last_quarter": worst(last, "rss_mb", sl)},
        "sn_fds": {"first_quarter": worst(first, "fds", sn), "last_quarter": worst(last, "fds", sn)},
        "sl_fds": {"first_quarter": worst(first, "fds", sl), "last_quarter": worst(last, "fds", sl)},
        "ledger_bytes_per_round": {"first_quarter": statistics.median(growth[:max(1, len(growth) // 4)]),
                                   "last_quarter": statistics.median(growth[-max(1, len(growth) // 4):])},
        "ledger_bytes": samples[-1]["ledger_bytes"], "ledger_file_bytes": file_bytes, "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--mb", type=float, default=0.3, help="payload per peer in MB")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 peers, 40 rounds")
    parser.add_argument("--out", type=Path, default=None,
                        help="raw figures (default bench/results/soak.json, soak-quick.json with --quick)")
    args = parser.parse_args()
    args.out = args.out or RESULTS / f"soak{'-quick' if args.quick else ''}.json"
    if args.quick:
        args.peers, args.rounds = 4, 40
    print(f"soak: {args.peers} SL processes, {args.rounds} rounds of {args.mb} MB per peer, ML stand-ins as threads")
    report = soak(args.peers, args.rounds, args.mb)
    print(f"{'':>26} {'first quarter':>14} {'last quarter':>13}")
    for key, label in (("latency_ms", "round latency median, ms"), ("sn_rss_mb", "SN RSS, MB"),
                       ("sl_rss_mb", "SL RSS (largest), MB"), ("sn_fds", "SN open fds"),
                       ("sl_fds", "SL open fds (most)"), ("ledger_bytes_per_round", "ledger bytes per round")):
        print(f"{label:>26} {report[key]['first_quarter']:>14.1f} {report[key]['last_quarter']:>13.1f}")
    blobs = report["blobs"]
    print(f"SL RSS grew by {blobs['sl_rss_growth_mb']:.0f} MB at most from before the first round, "
          f"{blobs['sl_rss_growth_second_half_mb']:.0f} MB in the last {blobs['rounds_second_half']} rounds; "
          f"a blob store keeps up to {blobs['store_capacity']} blobs of {blobs['blob_mb']:.2f} MB")
    print(f"ledger: {report['entries']} entries, {report['ledger_bytes'] / 1e6:.2f} MB of entries, "
          f"{report['ledger_file_bytes'] / 1e6:.2f} MB on disk (with the write-ahead log); full verify "
          f"{report['verify_s']:.2f} s ({report['entries'] / report['verify_s']:.0f} entries/s)")
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
