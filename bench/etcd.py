"""The ledger on a three-member etcd cluster versus the SN's SQLite file, side by side in one run:
append latency, a 3-peer round's latency, and the failover of a client from a killed SN to another.

    python -m bench etcd [--appends 300] [--rounds 40] [--kills 5] [--quick] [--hosts netns|loopback]

The etcd cluster's three members run each in a network namespace of its own (an emulated host of
tests/netns.py, on one bridge; this needs root and `ip`), and the benchmark with its SNs and SLs runs
in the first of them, as an SN beside its own member on a host would. --hosts loopback (the fallback
where namespaces cannot be made) puts the members on 127.0.0.1 instead.

  append    N signed `contract_create` submits, one at a time, from a SWCI client through one SN:
            the time of each Submit call (signature check, state machine, store, reply). Paced at
            SUBMIT_PACE so that the SN's per-certificate submit budget (50/s) never makes one wait.
  round     3 peers, each its own `swarm sl` process, 0.3 MB payload each: from the last check-in to
            every peer holding the merged model (bench/round.py's run_cell, 2 warm-up rounds a block).
For both, a SQLite swarm and an etcd swarm run at once and are measured in alternating blocks (ABBA),
so that the load of a shared machine, which drifts, weighs on both alike.
  failover  three SNs on the etcd ledger; a client given all three addresses submits continuously;
            the SN it is using is SIGKILLed, and the time from the kill to the first submit answered
            by another SN is taken; that SN is started again before the next kill (each host in turn).
Targets (issue 13): etcd round <= 1.5 x the SQLite round; failover <= 3 s. Raw figures go to
bench/results/etcd.json (etcd-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # netns.py: the emulated hosts of the multi-host tests
from bench import write_figures  # noqa: E402
from bench._swarm import ETCD_MEMBERS, LEDGERS, LocalSwarm  # noqa: E402
from bench.round import run_cell  # noqa: E402
from swarmlearn.sn.client import SNClient  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROUND_TARGET = 1.5  # etcd round / SQLite round
FAILOVER_TARGET_S = 3.0
ROUND_MB = 0.3
ROUND_PEERS = 3
SUBMIT_PACE = 0.025  # seconds between submit starts: 40/s, inside the SN's 50/s per certificate
WARM_UP_APPENDS = 5
APPEND_BLOCK = 50
ROUND_BLOCK = 5


def summary(values: list[float]) -> dict:
    return {"values": values, "median": statistics.median(values), "p95": float(np.percentile(values, 95)),
            "max": max(values)}


def swci_client(swarm: LocalSwarm, addresses: list[str]) -> SNClient:
    client = SNClient(addresses, swarm.identity("swci"))
    client.wait_ready(30)
    client.register("SWCI")
    return client


def arms(block: int) -> tuple[str, ...]:
    """The ledgers in the order block `block` measures them: ABBA, so a drift in the machine's load
    weighs on both alike."""
    return LEDGERS if block % 2 == 0 else LEDGERS[::-1]


def timed_appends(client: SNClient, count: int, start: int) -> list[float]:
    """Milliseconds of each of `count` paced submits through `client`."""
    times = []
    for i in range(start, start + count):
        started = time.perf_counter()
        client.submit("contract_create", {"name": f"append-{i}"})
        took = time.perf_counter() - started
        times.append(took * 1000)
        time.sleep(max(0.0, SUBMIT_PACE - took))
    return times


EtcdHosts = list[tuple[str, str]] | None  # (namespace, address) of each etcd member; None: 127.0.0.1


def append_latency(appends: int, etcd_hosts: EtcdHosts) -> dict:
    """Per-submit milliseconds through one SN on each ledger, both swarms up, in alternating blocks."""
    swarms = {ledger: LocalSwarm(ledger=ledger, etcd_hosts=etcd_hosts) for ledger in LEDGERS}
    clients: dict[str, SNClient] = {}
    times: dict[str, list[float]] = {ledger: [] for ledger in LEDGERS}
    try:
        for ledger, swarm in swarms.items():
            clients[ledger] = swci_client(swarm, [swarm.start_sn()])
            timed_appends(clients[ledger], WARM_UP_APPENDS, -WARM_UP_APPENDS)  # channel, handshake
        for block, done in enumerate(range(0, appends, APPEND_BLOCK)):
            for ledger in arms(block):
                times[ledger] += timed_appends(clients[ledger], min(APPEND_BLOCK, appends - done), done)
    finally:
        for client in clients.values():
            client.close()
        for swarm in swarms.values():
            swarm.stop()
    return {ledger: summary(values) for ledger, values in times.items()}


def round_latency(rounds: int, etcd_hosts: EtcdHosts) -> dict:
    """A 3-peer round's milliseconds on each ledger, both swarms up, in alternating blocks of rounds
    (each block after run_cell's 2 warm-up rounds)."""
    swarms = {ledger: LocalSwarm(ledger=ledger, etcd_hosts=etcd_hosts) for ledger in LEDGERS}
    latencies: dict[str, list[float]] = {ledger: [] for ledger in LEDGERS}
    try:
        channels = {ledger: swarm.start_peers([f"node{i + 1}" for i in range(ROUND_PEERS)], ROUND_PEERS - 1)
                    for ledger, swarm in swarms.items()}
        for block, done in enumerate(range(0, rounds, ROUND_BLOCK)):
            for ledger in arms(block):
                cell = run_cell(swarms[ledger], channels[ledger], ROUND_MB, min(ROUND_BLOCK, rounds - done))
                latencies[ledger] += cell["latency_ms"]
    finally:
        for swarm in swarms.values():
            swarm.stop()
    return {ledger: {**summary(values), "bytes": cell["bytes"]} for ledger, values in latencies.items()}


class Submitter:
    """Submits through `client` every SUBMIT_PACE seconds, noting when each answer came and from which SN."""

    def __init__(self, client: SNClient):
        self.client = client
        self.answers: list[tuple[float, str]] = []  # (monotonic time, SN that answered)
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            try:
                self.client.submit("contract_create", {"name": f"failover-{time.time_ns()}-{i}"})
                self.answers.append((time.monotonic(), self.client.address))
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                self.errors.append(exc)
                return
            i += 1
            self.stopping.wait(SUBMIT_PACE)

    def first_answer_from_other(self, than: str, since: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.errors:
            for when, address in list(self.answers):
                if when >= since and address != than:
                    return when
            time.sleep(0.005)
        raise RuntimeError(f"no submit answered by an SN other than {than} within {timeout:.0f} s"
                           + (f": {self.errors[0]}" if self.errors else ""))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


def failover_once(swarm: LocalSwarm, hosts: dict[str, int], victim_host: int) -> tuple[float, str]:
    """Kills the SN a continuously submitting client uses (host `victim_host`'s, the first of its
    addresses); returns the seconds to the first submit another SN answered, and the killed SN's address."""
    addresses = sorted(hosts, key=lambda address: hosts[address] != victim_host)
    client = swci_client(swarm, addresses)
    submitter = Submitter(client)
    try:
        while len(submitter.answers) < 5 and not submitter.errors:  # it is submitting through the victim
            time.sleep(0.01)
        victim = client.address
        killed_at = time.monotonic()
        os.kill(swarm.sns[victim].popen.pid, signal.SIGKILL)
        answered_at = submitter.first_answer_from_other(victim, killed_at, timeout=30)
    finally:
        submitter.stop()
        client.close()
    swarm.sns[victim].popen.wait(10)
    del swarm.sns[victim]
    return answered_at - killed_at, victim


def failover(kills: int, etcd_hosts: EtcdHosts) -> dict:
    swarm = LocalSwarm(ledger="etcd", etcd_hosts=etcd_hosts)
    seconds, killed = [], []
    try:
        hosts = {swarm.start_sn(host): host for host in (1, 2, 3)}
        for k in range(kills):
            took, victim = failover_once(swarm, hosts, k % len(hosts) + 1)
            host = hosts.pop(victim)
            seconds.append(took)
            killed.append(f"sn-{host}")
            print(f"  kill {k + 1}: SN of host {host} killed, another answered {took:.2f} s later", flush=True)
            hosts[swarm.start_sn(host)] = host  # the same data dir, on a new port
    finally:
        swarm.stop()
    return {**summary(seconds), "killed": killed}


def ratio_row(name: str, sqlite: float, etcd: float, unit: str, target: float | None = None) -> str:
    ratio = etcd / sqlite
    verdict = "" if target is None else (f"≤ {target}×: {'met' if ratio <= target else 'MISSED'}")
    return f"{name:<24} {sqlite:>10.1f} {etcd:>10.1f} {unit:<3} {ratio:>8.2f}×  {verdict}"


def print_table(report: dict) -> None:
    a, r, f = report["append_ms"], report["round_ms"], report["failover_s"]
    print(f"\n{'':<24} {'SQLite':>10} {'etcd x3':>10} {'':<3} {'etcd ÷ SQLite':>9}")
    print(ratio_row("append, median", a["sqlite"]["median"], a["etcd"]["median"], "ms"))
    print(ratio_row("append, p95", a["sqlite"]["p95"], a["etcd"]["p95"], "ms"))
    print(ratio_row(f"round {ROUND_PEERS}×{ROUND_MB} MB, median", r["sqlite"]["median"], r["etcd"]["median"], "ms",
                    ROUND_TARGET))
    print(ratio_row(f"round {ROUND_PEERS}×{ROUND_MB} MB, p95", r["sqlite"]["p95"], r["etcd"]["p95"], "ms"))
    met = "met" if f["max"] <= FAILOVER_TARGET_S else "MISSED"
    print(f"{'failover to another SN':<24} {'':>10} {f['median']:>10.2f} s   median of {len(f['values'])}, "
          f"max {f['max']:.2f} s; ≤ {FAILOVER_TARGET_S:.0f} s: {met}")


def parse_etcd_hosts(spec: str) -> list[tuple[str, str]]:
    hosts = [tuple(item.split("=", 1)) for item in spec.split(",") if item]
    if len(hosts) != ETCD_MEMBERS or any(len(host) != 2 or not all(host) for host in hosts):
        raise argparse.ArgumentTypeError(f"{spec!r}: give {ETCD_MEMBERS} NAMESPACE=ADDRESS, comma separated")
    return hosts


def run_in_hosts(argv: list[str]) -> int:
    """Runs this benchmark again inside the first of ETCD_MEMBERS emulated hosts, with an etcd member
    on each; removes the hosts when it ends (it stops every process it started there)."""
    from netns import Hosts

    hosts = Hosts.create(ETCD_MEMBERS)
    try:
        spec = ",".join(f"{host.ns}={host.ip}" for host in hosts)
        return subprocess.call(hosts[0].command([sys.executable, "-m", "bench", "etcd", *argv, "--etcd-hosts", spec]),
                               cwd=ROOT)
    finally:
        hosts.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=300, help="submits per ledger (default 300)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per ledger (default 40)")
    parser.add_argument("--kills", type=int, default=5, help="SN kills in the failover case (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 appends, 5 rounds, 2 kills")
    parser.add_argument("--out", type=Path, default=None,
                        help="raw figures (default bench/results/etcd.json, etcd-quick.json with --quick)")
    parser.add_argument("--hosts", choices=("netns", "loopback"), default="netns",
                        help="etcd members each in a network namespace (default; needs root), or all on 127.0.0.1")
    parser.add_argument("--etcd-hosts", type=parse_etcd_hosts, default=None, metavar="NS=IP,NS=IP,NS=IP",
                        help="the members' namespaces and addresses, this process running where it reaches them "
                             "(what --hosts netns passes to its run inside the first host)")
    args = parser.parse_args()
    if args.hosts == "netns" and args.etcd_hosts is None:
        from netns import missing_prerequisite

        why_not = missing_prerequisite()
        if why_not is None:
            sys.exit(run_in_hosts(sys.argv[1:]))
        print(f"etcd members on 127.0.0.1, not in namespaces: {why_not}", flush=True)
    if args.quick:
        args.appends, args.rounds, args.kills = 50, 5, 2
    if min(args.appends, args.rounds, args.kills) < 1:
        parser.error("--appends, --rounds and --kills must be at least 1")
    args.out = args.out or RESULTS / f"etcd{'-quick' if args.quick else ''}.json"
    # The client's one line per SN switch would interleave with the table; the switch is what is timed.
    logging.getLogger("swarmlearn.sn.client").setLevel(logging.ERROR)
    members = (f"one per network namespace ({', '.join(ip for _, ip in args.etcd_hosts)})" if args.etcd_hosts
               else "on 127.0.0.1")
    print(f"SQLite: the SN's ledger file; etcd: {ETCD_MEMBERS} members {members}, mutual TLS; {args.appends} appends, "
          f"{args.rounds} rounds, {args.kills} kills; {os.cpu_count()} CPUs", flush=True)
    started = time.monotonic()
    report: dict = {"appends": args.appends, "rounds": args.rounds, "kills": args.kills, "cpus": os.cpu_count(),
                    "submit_pace_s": SUBMIT_PACE, "append_block": APPEND_BLOCK, "round_block": ROUND_BLOCK,
                    "etcd_members": members}
    report["append_ms"] = append_latency(args.appends, args.etcd_hosts)
    print("  append: " + ", ".join(f"{k} median {v['median']:.1f} ms" for k, v in report["append_ms"].items()),
          flush=True)
    report["round_ms"] = round_latency(args.rounds, args.etcd_hosts)
    print("  round: " + ", ".join(f"{k} median {v['median']:.1f} ms" for k, v in report["round_ms"].items()),
          flush=True)
    report["failover_s"] = failover(args.kills, args.etcd_hosts)
    report["round_ratio"] = report["round_ms"]["etcd"]["median"] / report["round_ms"]["sqlite"]["median"]
    report["round_target_met"] = report["round_ratio"] <= ROUND_TARGET
    report["failover_target_met"] = report["failover_s"]["max"] <= FAILOVER_TARGET_S
    report["total_s"] = time.monotonic() - started
    print_table(report)
    print(f"total {report['total_s']:.0f} s")
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
