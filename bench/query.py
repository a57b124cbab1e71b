"""What one poll of `WAIT FOR TASKRUNNER` costs as the ledger grows: a synthetic run of ROUNDS rounds of
NODES nodes (each round: a check-in per node, the leader's merged entry, a training and a validation
report per node), every entry signed and accepted by the state machine and written to a ledger file in
one transaction; a real SN (in this process) serves it, and a SWCI's client on 127.0.0.1 (gRPC, mutual
TLS) polls it, side by side:

- old: Query "all", the full-state dump the wait used to poll;
- new: Query "taskrunner" with the runner's name, the narrow answer the wait polls now.

One entry is appended before every poll (during a training the head moves between polls, so each
reply is made afresh rather than served from the SN's per-head copy); the append is not timed.

    .venv/bin/python -m bench query [--rounds 1000] [--nodes 8] [--polls 15] [--quick]

--quick: 10 and 60 rounds (a smoke run, under 10 s). Prints each poll's median and worst time and
reply size per ledger length; writes bench/results/query.json. Target (issue 14): the new poll
<= 5 ms at any ledger length."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import write_figures  # noqa: E402
from swarmlearn import pki  # noqa: E402
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, SignedTx  # noqa: E402
from swarmlearn.ledger.signatures import registration, sign_tx  # noqa: E402
from swarmlearn.ledger.sqlite_store import SQLiteStore  # noqa: E402
from swarmlearn.ledger.state import LedgerState  # noqa: E402
from swarmlearn.ledger.store import StoredEntry  # noqa: E402
from swarmlearn.sn.client import SNClient  # noqa: E402
from swarmlearn.sn.server import LEDGER_FILE, genesis_tx, start_sn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "query.json"
TARGET_MS = 5.0
RUNNER = "default"


class Swarm:
    """The identities of a synthetic swarm and the ledger they write: folded here as it is written (so
    each entry is one the state machine accepts), stored in one go (`store`), then served by an SN."""

    def __init__(self, cert_dir: Path, nodes: int):
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        if not cert_dir.exists():  # made once, for every ledger length measured
            pki.generate_host_certs(cert_dir, 1, components=("sn", "swop", "swci"), nodes=self.names)
        layout = pki.CertLayout(cert_dir, 1)
        self.sn = pki.Identity.load(layout.key("sn"), layout.cert("sn"), layout.capath)
        self.swop = pki.Identity.load(layout.key("swop"), layout.cert("swop"), layout.capath)
        self.swci = pki.Identity.load(layout.key("swci"), layout.cert("swci"), layout.capath)
        self.nodes = {n: pki.Identity.load(layout.node_key(n), layout.node_cert(n), layout.capath) for n in self.names}
        self.state = LedgerState()
        self.rows: list[StoredEntry] = []
        self.chain = None  # the serving SN's, for the entries appended between polls
        self.reports = 0

    def submit(self, identity: pki.Identity, kind: str, payload: dict, name: str | None = None) -> None:
        signed = sign_tx(identity, name or identity.name, kind, payload)
        if self.chain is not None:
            self.chain.submit(signed)
        else:
            self.append(signed)

    def append(self, signed: SignedTx) -> None:
        entry = Entry(self.state.head_index + 1, self.state.head_hash or GENESIS_PREV_HASH, signed.tx,
                      signed.signature)
        self.state.apply(entry)
        self.rows.append(StoredEntry(entry.index, entry.hash, entry.body_bytes()))

    def store(self, path: Path) -> None:
        store = SQLiteStore(path)
        try:
            store.append_rows(self.rows)
        finally:
            store.close()

    def found(self) -> None:
        """Registers everyone, and a task runner running a task on the SWOP's peers (what a wait polls)."""
        self.append(genesis_tx(self.sn, "127.0.0.1:1"))
        for identity in (self.swop, self.swci):
            self.submit(identity, "register_node", registration(identity, ""))
        for n, identity in self.nodes.items():
            self.submit(identity, "register_node", registration(identity, "127.0.0.1:1"), n)
            self.submit(identity, "session_join", {"contract": "default", "node": n, "min_peers": len(self.nodes)}, n)
        self.submit(self.swci, "task_create", {"name": "train", "type": "RUN_SWARM", "prereq": "ROOTTASK",
                                               "body": {"Command": "model/model.py"}})
        self.submit(self.swci, "task_finalize", {"name": "train"})
        self.submit(self.swop, "taskrunner_join", {"runner": RUNNER, "capacity": len(self.nodes)})
        self.submit(self.swci, "taskrunner_assign", {"runner": RUNNER, "task": "train", "peers": len(self.nodes)})

    def round(self, r: int) -> None:
        for n, identity in self.nodes.items():
            self.submit(identity, "checkin", {"contract": "default", "round": r, "node": n, "hash": f"{r:064x}",
                                              "weight": 1.0, "size": 4096}, n)
        leader = self.state.contract("default").rounds[r].leader
        self.submit(self.nodes[leader], "merged", {"contract": "default", "round": r, "hash": f"{r + 1:064x}",
                                                   "size": 4096}, leader)
        for n, identity in self.nodes.items():
            self.submit(identity, "metrics", {"contract": "default", "node": n, "kind": "train", "round": r,
                                              "step": r * 10, "epoch": r / 50, "loss": 1 / r}, n)
            self.submit(identity, "metrics", {"contract": "default", "node": n, "kind": "validation", "round": r,
                                              "step": r * 10, "metric": 0.5, "metric_name": "accuracy",
                                              "loss": 1 / r}, n)

    def move_head(self) -> None:
        """One more entry, as a training appends between two polls."""
        self.reports += 1
        n = self.names[0]
        self.submit(self.nodes[n], "metrics", {"contract": "default", "node": n, "kind": "train",
                                               "step": self.reports}, n)


def poll_times(swarm: Swarm, client: SNClient, section: str, polls: int) -> tuple[list[float], int]:
    """Seconds per poll of `section` (each after the head moved), and the last reply's bytes."""
    times, size = [], 0
    for _ in range(polls):
        swarm.move_head()
        started = time.perf_counter()
        reply = client.query(section, RUNNER if section == "taskrunner" else "")
        times.append(time.perf_counter() - started)
        size = len(json.dumps(reply).encode())
    return times, size


def measure(rounds: int, nodes: int, polls: int, cert_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="swarm-bench-query-") as tmp:
        work = Path(tmp)
        swarm = Swarm(cert_dir, nodes)
        started = time.perf_counter()
        swarm.found()
        for r in range(1, rounds + 1):
            swarm.round(r)
        (work / "sn").mkdir()
        swarm.store(work / "sn" / LEDGER_FILE)
        written = time.perf_counter() - started
        server = start_sn(host="127.0.0.1", port=0, identity=swarm.sn, data_dir=work / "sn", sentinel=True)
        try:
            swarm.chain = server.chain
            with SNClient(server.address, swarm.swci) as client:
                client.query("head")  # connect (TLS handshake) before timing
                old, old_size = poll_times(swarm, client, "all", polls)
                new, new_size = poll_times(swarm, client, "taskrunner", polls)
            entries = server.chain.state.head_index + 1
        finally:
            server.stop()
    row = {"rounds": rounds, "nodes": nodes, "entries": entries, "write_s": written,
           "old_median_ms": statistics.median(old) * 1e3, "old_max_ms": max(old) * 1e3, "old_bytes": old_size,
           "new_median_ms": statistics.median(new) * 1e3, "new_max_ms": max(new) * 1e3, "new_bytes": new_size}
    print(f"{rounds:6d} rounds x {nodes} nodes ({entries:6d} entries, written in {written:5.1f} s): "
          f"old 'all' {row['old_median_ms']:8.2f} ms median, {row['old_max_ms']:8.2f} max, {old_size:9d} B | "
          f"new 'taskrunner' {row['new_median_ms']:6.2f} ms median, {row['new_max_ms']:6.2f} max, {new_size:6d} B",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--polls", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="10 and 60 rounds: a smoke run")
    args = parser.parse_args()
    lengths = [10, 60] if args.quick else [10, args.rounds]
    with tempfile.TemporaryDirectory(prefix="swarm-bench-query-certs-") as certs:
        rows = [measure(rounds, args.nodes, 5 if args.quick else args.polls, Path(certs) / "cert")
                for rounds in lengths]
    worst = max(r["new_median_ms"] for r in rows)
    verdict = "met" if worst <= TARGET_MS else "missed"
    print(f"new poll, median at the longest ledger: {rows[-1]['new_median_ms']:.2f} ms; worst median "
          f"{worst:.2f} ms (target <= {TARGET_MS:g} ms: {verdict})")
    write_figures(RESULTS, {"target_ms": TARGET_MS, "verdict": verdict, "quick": args.quick, "rows": rows})


if __name__ == "__main__":
    main()
