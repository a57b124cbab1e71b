"""Follower start-up on a long ledger: from the SN's snapshot, side by side with --full-replay.

    .venv/bin/python -m bench startup [--entries N] [--repeats R] [--checkpoint-every C] [--quick]

Builds a ledger of N entries (default 100,000) of the kinds a training swarm writes (registrations, a
task and its runner, then rounds: four check-ins, the merge, four metrics reports), signed by real
certificates of a few identities, with a checkpoint every C entries as an SN writes them. It is
written straight through the store (the state machine checks each entry; signatures are made, not
checked, to build fast), then a real `swarm sn` process opens it (folding and checking all of it:
its start-up is reported too) and this process starts followers against it over mutual TLS:
  snapshot     LedgerFollower as SL and SWOP start it: the SN's snapshot, its checkpoint, the tail.
  full-replay  LedgerFollower(full_replay=True): every entry from 0, every checkpoint checked.
Start-up is the time from start() to a state at the SN's head; the median of R runs is printed beside
the target (snapshot <= 1 s) and every figure is written to bench/results/startup.json.
--quick: 3,000 entries, checkpoints every 300, 3 runs (about 10 s on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from swarmlearn import pki
from swarmlearn.ledger import state as state_module
from swarmlearn.ledger.chain import ChainVerifier
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, SignedTx, Signer, Tx
from swarmlearn.ledger.model import PROTOCOL_VERSION
from swarmlearn.ledger.signatures import registration
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.store import LedgerStore, StoredEntry

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
NODES = ["node1", "node2", "node3", "node4"]
CONTRACT = "default-contract"
RUNNER = "default-runner"
TARGET_S = 1.0


class LedgerBuilder:
    """Appends signed entries to a store in batches, folding each into a ChainVerifier's state (so every
    entry is one the state machine accepts) without checking signatures it just made."""

    BATCH = 2000

    def __init__(self, store: LedgerStore, ids: dict[str, pki.Identity], checkpoint_every: int):
        self.store = store
        self.ids = ids
        self.checkpoint_every = checkpoint_every
        self.sn_name = next(name for name, i in ids.items() if i.swarm_id and i.swarm_id.role == "sn")
        self.verifier = ChainVerifier()
        self._pending: list[StoredEntry] = []
        self._windowed = any(f.name == "valid_until" for f in fields(Tx))
        self._window = getattr(state_module, "MAX_VALIDITY_WINDOW", 0) // 2

    @property
    def state(self):
        return self.verifier.state

    def add(self, signer: str, kind: str, payload: dict) -> Entry:
        state = self.state
        extra = {"valid_until": state.head_index + 1 + self._window} if self._windowed and self._window else {}
        tx = Tx(kind, payload, Signer(signer, self.ids[signer].fingerprint), time=1e9 + state.head_index, **extra)
        signed = SignedTx(tx, self.ids[signer].sign(tx.signing_bytes()))
        entry = Entry(state.head_index + 1, state.head_hash or GENESIS_PREV_HASH, signed.tx, signed.signature)
        state.apply(entry)
        self.verifier.signatures.learn(tx)
        self._pending.append(StoredEntry(entry.index, entry.hash, entry.body_bytes()))
        if len(self._pending) >= self.BATCH:
            self.flush()
        if kind != "checkpoint" and (entry.index + 1) % self.checkpoint_every == 0:
            _, digest = self.verifier.snapshot_document()
            self.add(self.sn_name, "checkpoint", {"index": entry.index, "state_hash": digest})
        return entry

    def flush(self) -> None:
        if self._pending:
            self.store.append_rows(self._pending)
            self._pending = []


def bench_identities(root: Path) -> dict[str, pki.Identity]:
    """Certificates of organization "bench": the SN, SWOP and SWCI components and four training nodes."""
    layout = pki.CertLayout(root, 1)
    pki.generate_host_certs(root, 1, org="bench", nodes=NODES)
    found = {c: pki.Identity.load(layout.key(c), layout.cert(c), layout.capath) for c in ("sn", "swop", "swci")}
    found.update({n: pki.Identity.load(layout.node_key(n), layout.node_cert(n), layout.capath) for n in NODES})
    return found


def build_ledger(store: LedgerStore, ids: dict[str, pki.Identity], entries: int, checkpoint_every: int) -> None:
    """A swarm's ledger of about `entries` entries (it ends with a whole round) into an empty store."""
    builder = LedgerBuilder(store, {i.name: i for i in ids.values()}, checkpoint_every)
    sn, swop, swci = (ids[c].name for c in ("sn", "swop", "swci"))
    ca = pki.cert_to_pem(ids["sn"].cas[0]).decode()
    builder.add(sn, "genesis", {"swarm_id": "bench", "protocol": PROTOCOL_VERSION, "default_contract": CONTRACT,
                                "default_taskrunner": RUNNER, "created": 1e9,
                                "cas": [{"cert": ca, "org": "bench", "roles": list(pki.ROLES)}],
                                "sn": registration(ids["sn"], "127.0.0.1:1")})
    for who in (swop, swci, *NODES):
        builder.add(who, "register_node", registration(builder.ids[who], "127.0.0.1:2"))
    _tasks(builder, swop, swci)
    for node in NODES:
        builder.add(node, "session_join", {"contract": CONTRACT, "node": node})
    round_no = 1
    while builder.state.head_index + 1 < entries:
        _round(builder, round_no)
        round_no += 1
    builder.flush()


def _tasks(builder: LedgerBuilder, swop: str, swci: str) -> None:
    builder.add(swci, "task_create", {"name": "train", "type": "RUN_SWARM", "prereq": "ROOTTASK",
                                      "body": {"command": "python train.py", "epochs": 10}})
    builder.add(swci, "task_finalize", {"name": "train"})
    builder.add(swop, "taskrunner_join", {"runner": RUNNER, "capacity": 4})
    builder.add(swci, "taskrunner_assign", {"runner": RUNNER, "task": "train", "peers": 4})
    builder.add(swop, "taskrunner_claim", {"runner": RUNNER, "generation": 1, "peers": NODES})
    for node in NODES:
        builder.add(swop, "taskrunner_peer_status", {"runner": RUNNER, "generation": 1, "peer": node,
                                                     "status": "RUNNING"})


def _round(builder: LedgerBuilder, number: int) -> None:
    for node in NODES:
        builder.add(node, "checkin", {"contract": CONTRACT, "round": number, "node": node,
                                      "hash": f"{number:08x}{node}".ljust(64, "0"), "weight": 100.0, "size": 300_000})
    leader = builder.state.contract(CONTRACT).rounds[number].leader
    builder.add(leader, "merged", {"contract": CONTRACT, "round": number, "hash": f"{number:08x}merged".ljust(64, "0"),
                                   "size": 300_000})
    for i, node in enumerate(NODES):
        builder.add(node, "metrics", {"contract": CONTRACT, "node": node, "kind": "train", "round": number,
                                      "loss": round(1.0 / (number + i), 6), "step": number * 10})


# ------------------------------------------------------------------------------ measuring

def start_sn(root: Path, data_dir: Path, checkpoint_every: int) -> tuple[subprocess.Popen, str, float]:
    """`swarm sn` on the ledger in `data_dir`; returns it, its address and how long it took to serve."""
    layout = pki.CertLayout(root, 1)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmlearn.cli", "sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0",
         "--data-dir", str(data_dir), "--key", str(layout.key("sn")), "--cert", str(layout.cert("sn")),
         "--capath", str(layout.capath)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "SWARM_CHECKPOINT_EVERY": str(checkpoint_every)})
    said = []
    for line in proc.stdout:
        if "SN ready on " in line:
            return proc, line.split("SN ready on ")[1].split()[0], time.monotonic() - started
        said.append(line)
    raise RuntimeError(f"swarm sn ended (exit {proc.wait()}) before it served:\n{''.join(said[-20:])}")


def follower_startup(address: str, identity: pki.Identity, full_replay: bool) -> tuple[float, float]:
    """Seconds from start() until a new follower's state reaches the SN's head, and the CPU seconds this
    process spent meanwhile (the follower's own work, whatever else loads the machine)."""
    from swarmlearn.sn.client import SNClient
    from swarmlearn.sn.follower import LedgerFollower

    with SNClient(address, identity) as client:
        head = client.query("info")["info"]["head_index"]
        follower = LedgerFollower(client, full_replay=full_replay)
        started, cpu = time.monotonic(), time.process_time()
        follower.start()
        try:
            reached = follower.wait_until(lambda s: s.head_index >= head, timeout=3600)
            took, cpu = time.monotonic() - started, time.process_time() - cpu
            if not reached:
                raise RuntimeError(f"the follower did not reach entry {head} within an hour")
            if full_replay == (follower.started_from is not None):
                raise RuntimeError(f"the follower started from {follower.started_from}, full_replay={full_replay}")
        finally:
            follower.stop()
    return took, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--replay-repeats", type=int, default=1, help="runs of --full-replay (slow on long ledgers)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.entries, args.checkpoint_every, args.repeats = 3_000, 300, 3
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        run(Path(tmp), args)


def run(tmp: Path, args) -> None:
    ids = bench_identities(tmp / "certs")
    data_dir = tmp / "sn"
    data_dir.mkdir()
    began = time.monotonic()
    store = SQLiteStore(data_dir / "ledger.db")
    try:
        build_ledger(store, ids, args.entries, args.checkpoint_every)
    finally:
        store.close()
    built = time.monotonic() - began
    print(f"built a ledger of {args.entries} entries in {built:.1f} s", flush=True)
    proc, address, sn_start = start_sn(tmp / "certs", data_dir, args.checkpoint_every)
    try:
        print(f"swarm sn served it after {sn_start:.1f} s (folds and checks every entry)", flush=True)
        snapshot = [follower_startup(address, ids["swop"], False) for _ in range(args.repeats)]
        replay = [follower_startup(address, ids["swop"], True) for _ in range(args.replay_repeats)]
    finally:
        proc.terminate()
        proc.wait(10)
    report(args, built, sn_start, snapshot, replay)


def report(args, built: float, sn_start: float, snapshot: list[tuple[float, float]],
           replay: list[tuple[float, float]]) -> None:
    load = os.getloadavg()[0]
    med, rep = statistics.median(s for s, _ in snapshot), statistics.median(s for s, _ in replay)
    med_cpu, rep_cpu = statistics.median(c for _, c in snapshot), statistics.median(c for _, c in replay)
    verdict = "met" if med <= TARGET_S else "MISSED"
    print(f"follower start-up on {args.entries} entries: snapshot median {med:.3f} s wall, {med_cpu:.3f} s CPU "
          f"(runs {', '.join(f'{s:.3f}' for s, _ in snapshot)}); --full-replay median {rep:.2f} s wall, "
          f"{rep_cpu:.2f} s CPU ({rep / med:.0f}x); target <= {TARGET_S:g} s: {verdict}; load average {load:.2f} "
          f"on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "entries": args.entries, "checkpoint_every": args.checkpoint_every, "quick": args.quick,
        "build_s": built, "sn_start_s": sn_start, "snapshot_s": [s for s, _ in snapshot],
        "snapshot_cpu_s": [c for _, c in snapshot], "full_replay_s": [s for s, _ in replay],
        "full_replay_cpu_s": [c for _, c in replay], "snapshot_median_s": med, "full_replay_median_s": rep,
        "snapshot_median_cpu_s": med_cpu, "full_replay_median_cpu_s": rep_cpu, "target_s": TARGET_S, "load_average": load,
        "python": sys.version.split()[0], "machine": platform.machine(),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
