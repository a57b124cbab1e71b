"""Round time across a WAN: the exchange-only swarm of bench/round.py, each SL on a host of its own,
the hosts 50 ms apart (round trip) on 100 Mbit/s links, for 0.3 MB and 40 MB payloads, against the floor.

Hosts: network namespaces on one bridge (tests/netns.py), made and removed by this benchmark (root,
`ip`, `tc`, /dev/net/tun). The network (bench/_relay.py): every host's link capped both ways by the
kernel's `tbf` qdisc, and every packet between two hosts delayed RTT/2 by a packet relay, so TCP runs
end to end and slow start shows. The SN runs on host 1 beside node1's SL; node i's SL on host i; the
ML stand-ins (random float32 tensors, no training) are threads of this process, reaching their SLs
over Unix sockets, as in bench/round.py, whose pieces this reuses.

Measured: from the last check-in of a round to every peer holding the verified merged model (as
bench/round.py), median over the rounds after one warm-up round. Floor, as issue 14 defines it (kept
so that figures stay comparable): 2 RTT + the bytes on the critical path of a star ÷ the link rate,
the leader taking in the n−1 contributions over its one downlink, then serving the merged model to
the n−1 others over its one uplink: 2 (n−1) × payload. Target (issue 14): round ≤ 3 RTT + 1.2 × that
transfer time. The SLs no longer move the merged model as a star: it goes down a tree rooted at the
leader, each inner node passing every chunk on to its children as it arrives (cut-through), each node
serving at most `merged_fanout(payload)` others (sl/round.py: 8 below 4 MiB, 2 from there). The
"tree" columns give the bytes on that critical path, the leader's intake (n−1) × payload plus what its
uplink sends, fanout × payload (a level of the tree adds about one chunk's transfer, not counted),
and the floor they make (2 RTT + those bytes ÷ the rate). Each round sends tensors never sent before
(blobs are content-addressed: a repeated one is not fetched).
--keep-cwnd (default without --quick) measures the smallest payload once more with every host's
net.ipv4.tcp_slow_start_after_idle=0, side by side in the same run, to show what slow start after
idle costs the SLs' kept connections.

    python -m bench wan [--hosts 8] [--rtt-ms 50] [--rate-mbit 100] [--sizes 0.3,40] [--rounds 5]
                        [--[no-]keep-cwnd] [--quick]

--quick: 0.3 MB only, 3 rounds (a 40 MB round at 100 Mbit/s takes 45 s or more). Raw figures go to
bench/results/wan.json (wan-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # netns.py: the emulated hosts of the multi-host tests
from bench import write_figures  # noqa: E402
from bench._relay import Wan, wide_area  # noqa: E402
from bench._swarm import LocalSwarm  # noqa: E402
from bench.round import checkin_times, payload, percentile, run_rounds  # noqa: E402
from netns import Hosts, missing_prerequisite  # noqa: E402
from swarmlearn.callback.core import SLChannel  # noqa: E402
from swarmlearn.defaults import LEADER_BASE  # noqa: E402
from swarmlearn.sl.round import merged_fanout  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET_RTTS, TARGET_TRANSFER_FACTOR = 3, 1.2
FLOOR_RTTS = 2
WARM_UP_ROUNDS = 1
# The SLs' default budgets assume 20 MB/s; on a slower link a leader gets this many floors to merge.
LEADER_TIMEOUT_FLOORS = 3
SEEDS = itertools.count()  # one per round of the whole run, so that no round repeats another's tensors


def transfer_seconds(peers: int, size: int, rate_mbit: float) -> float:
    """Time to move the round's critical-path bytes (the star: n−1 blobs in, n−1 out) at the link rate."""
    return 2 * (peers - 1) * size * 8 / (rate_mbit * 1e6)


def tree_path_bytes(peers: int, size: int) -> int:
    """The bytes on the critical path with the merged model's cut-through tree: the leader's intake,
    n−1 contributions, then what its uplink sends, one copy per child."""
    return (peers - 1) * size + min(peers - 1, merged_fanout(size)) * size


def fresh_round(channels: dict[str, SLChannel], mb: float, seed: int) -> dict:
    """One round with blobs never sent before: blobs are content-addressed, so a peer that already
    holds one (the same tensors as last round) would not fetch it again."""
    blobs = {n: payload(mb, seed * len(channels) + i) for i, n in enumerate(channels)}
    return run_rounds(channels, blobs, 1)[0]


def measure(swarm: LocalSwarm, channels: dict[str, SLChannel], wan: Wan, mb: float, rounds: int) -> dict:
    nodes = list(channels)
    for _ in range(WARM_UP_ROUNDS):  # first allocation of this size, channels between SLs
        fresh_round(channels, mb, next(SEEDS))
    load_before = os.getloadavg()[0]
    sent_before = sum(wan.link_bytes(host)[0] for host in wan.hosts)
    results = [fresh_round(channels, mb, next(SEEDS)) for _ in range(rounds)]
    sent = sum(wan.link_bytes(host)[0] for host in wan.hosts) - sent_before
    last_checkin = checkin_times(swarm)
    seconds = [max(r["received"].values()) - last_checkin[r["round"]] for r in results]
    size = len(payload(mb, 0))
    transfer = transfer_seconds(len(nodes), size, wan.rate_mbit)
    floor = FLOOR_RTTS * wan.rtt_s + transfer
    target = TARGET_RTTS * wan.rtt_s + TARGET_TRANSFER_FACTOR * transfer
    median = statistics.median(seconds)
    tree_bytes = tree_path_bytes(len(nodes), size)
    return {"mb": mb, "bytes": size, "round_s": seconds, "median_s": median, "p90_s": percentile(seconds, 90),
            "min_s": min(seconds), "transfer_s": transfer, "floor_s": floor, "fanout": merged_fanout(size),
            "tree_path_bytes": tree_bytes,
            "tree_floor_s": FLOOR_RTTS * wan.rtt_s + tree_bytes * 8 / (wan.rate_mbit * 1e6),
            "target_s": target, "met": median <= target, "over_floor": median / floor,
            # every byte on the wire, headers and TLS included, once per link it leaves (uplinks' tbf)
            "wire_bytes_per_round": sent / rounds, "payload_bytes_per_round": 2 * (len(nodes) - 1) * size,
            "load_average": [load_before, os.getloadavg()[0]]}


def start_swarm(swarm: LocalSwarm, hosts: Hosts, leader_timeout: float) -> dict[str, SLChannel]:
    """The SN on host 1, node i's SL on host i; their ML channels joined to the default contract."""
    nodes = [f"node{i + 1}" for i in range(len(hosts))]
    swarm.start_sn(on=hosts[0])
    for node, host in zip(nodes, hosts):
        swarm.start_sl(node, "--leader-timeout", f"{leader_timeout:.0f}", on=host)
    channels = {n: SLChannel(swarm.sl_addresses[n]) for n in nodes}
    for channel in channels.values():
        channel.join("default", max(1, len(nodes) - 1), 1.0, "mean")
    return channels


def slow_start_after_idle(hosts: Hosts, on: bool) -> None:
    """Linux (on, its default) shrinks a connection's window back to the initial 10 packets after an
    idle RTO, so each round's transfers on the SLs' kept connections start slow again; TCP reads the
    setting at each send, so running processes follow a change."""
    for host in hosts:
        subprocess.run(host.command(["sysctl", "-q", "-w", f"net.ipv4.tcp_slow_start_after_idle={int(on)}"]),
                       check=True, capture_output=True, timeout=30)


def run(args: argparse.Namespace) -> dict:
    sizes = [float(x) for x in args.sizes.split(",")]
    rtt, work = args.rtt_ms / 1000, Path(os.environ.get("TMPDIR", "/tmp")) / f"swarm-wan-{os.getpid()}"
    largest = int(max(sizes) * 1e6)
    leader_timeout = max(LEADER_BASE, LEADER_TIMEOUT_FLOORS * transfer_seconds(args.hosts, largest, args.rate_mbit))
    report = {"hosts": args.hosts, "rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit, "rounds": args.rounds,
              "warm_up_rounds": WARM_UP_ROUNDS, "leader_timeout_s": leader_timeout, "cpus": os.cpu_count(),
              "cells": []}
    # Linux's default first, then (--keep-cwnd) the smallest payload again with the window kept.
    plan = [(mb, True) for mb in sizes] + ([(min(sizes), False)] if args.keep_cwnd else [])
    hosts = Hosts.create(args.hosts)
    try:
        with wide_area(hosts, rtt, args.rate_mbit, work) as wan:
            swarm = LocalSwarm(work / "swarm", sans=[host.ip for host in hosts])
            try:
                channels = start_swarm(swarm, hosts, leader_timeout)
                for mb, idle_restart in plan:
                    slow_start_after_idle(hosts, idle_restart)
                    cell = {**measure(swarm, channels, wan, mb, args.rounds), "slow_start_after_idle": idle_restart}
                    report["cells"].append(cell)
                    print(f"  measured {args.hosts} hosts x {mb} MB{'' if idle_restart else ', cwnd kept'}: median "
                          f"{cell['median_s']:.2f} s (target {cell['target_s']:.2f} s)", flush=True)
            except BaseException:
                print(swarm.tails(), flush=True)
                raise
            finally:
                swarm.stop()
        report["relay"] = wan.stats
    finally:
        hosts.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['hosts']} hosts, {report['rtt_ms']:.0f} ms RTT, {report['rate_mbit']:.0f} Mbit/s each way per "
          f"host; {report['rounds']} rounds per payload after {report['warm_up_rounds']} warm-up; SLs with "
          f"--leader-timeout {report['leader_timeout_s']:.0f}")
    print(f"{'payload':>14} {'median s':>9} {'p90 s':>7} {'min s':>7} {'floor s':>8} {'÷ floor':>8} {'target s':>9} "
          f"{'met':>4} {'tree MB':>8} {'tree floor s':>13} {'wire÷payload':>13} {'load avg':>9}")
    for c in report["cells"]:
        label = f"{c['mb']} MB" + ("" if c.get("slow_start_after_idle", True) else ", cwnd kept")
        print(f"{label:>14} {c['median_s']:>9.2f} {c['p90_s']:>7.2f} {c['min_s']:>7.2f} {c['floor_s']:>8.2f} "
              f"{c['over_floor']:>8.2f} {c['target_s']:>9.2f} {'yes' if c['met'] else 'no':>4} "
              f"{c['tree_path_bytes'] / 1e6:>8.1f} {c['tree_floor_s']:>13.2f} "
              f"{c['wire_bytes_per_round'] / c['payload_bytes_per_round']:>13.2f} {c['load_average'][1]:>9.2f}")
    relay = report.get("relay") or {}
    if relay:
        print(f"relay: {relay['packets']} packets, late by p50 {relay['late_ms_p50']:.2f} ms, p99 "
              f"{relay['late_ms_p99']:.2f} ms, max {relay['late_ms_max']:.1f} ms")
    print(f"floor = {FLOOR_RTTS} RTT + 2 (n−1) × payload ÷ link rate (the star); target = {TARGET_RTTS} RTT + "
          f"{TARGET_TRANSFER_FACTOR} × that transfer time; tree MB = the critical path's bytes with the merged "
          f"model's cut-through tree, (n−1 + fanout) × payload, and tree floor = {FLOOR_RTTS} RTT + those ÷ "
          f"link rate; cwnd kept: net.ipv4.tcp_slow_start_after_idle=0 on "
          f"every host (Linux's default, 1, restarts slow start on a connection idle for an RTO)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=8, help="emulated hosts, one peer each (default 8)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round trip added between hosts (default 50)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="each host's link, each way (default 100)")
    parser.add_argument("--sizes", default="0.3,40", help="payload per peer in MB, comma separated")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per payload (default 5)")
    parser.add_argument("--keep-cwnd", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the smallest payload with net.ipv4.tcp_slow_start_after_idle=0 on every "
                             "host (default: yes, no with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.3 MB only, 3 rounds")
    parser.add_argument("--out", type=Path, default=None,
                        help="raw figures (default bench/results/wan.json, wan-quick.json with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = "0.3", 3
    args.keep_cwnd = not args.quick if args.keep_cwnd is None else args.keep_cwnd
    if not 2 <= args.hosts <= 250 or args.rounds < 1 or args.rtt_ms < 0 or args.rate_mbit <= 0:
        parser.error("--hosts must be 2-250, --rounds at least 1, --rtt-ms 0 or more, --rate-mbit above 0")
    why_not = missing_prerequisite()
    if why_not:
        sys.exit(f"bench wan needs emulated hosts: {why_not}")
    args.out = args.out or RESULTS / f"wan{'-quick' if args.quick else ''}.json"
    started = time.monotonic()
    report = run(args)
    report["total_s"] = time.monotonic() - started
    print_table(report)
    print(f"total {report['total_s']:.0f} s")
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
