"""How fast the SN's ledger grows: SQLite store appends, full Chain.submit, and verify_store.

    .venv/bin/python bench/ledger_append.py [--entries N] [--repeats R] [--dir DIR]

Three cases, each on a fresh ledger file per repeat:
  store    SQLiteStore.append_if_head_is of pre-built entries: the store alone (one fsync'd commit each).
  submit   Chain.submit of pre-signed `metrics` transactions from a registered SL node, after a genesis
           made the way the sentinel SN makes it: signature check + state machine + store.
  verify   verify_store over the ledger `submit` wrote: hash, link, signature and state per entry.
Prints the median of the repeats and writes every figure to bench/results/ledger_append.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swarmlearn import pki
from swarmlearn.ledger.chain import Chain, verify_store
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, SignedTx, Signer, Tx
from swarmlearn.ledger.signatures import registration, sign_tx
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.sn.server import genesis_tx

RESULTS = Path(__file__).resolve().parent / "results" / "ledger_append.json"
SN_ID, SL_ID = "sn-0", "sl-0"


@dataclass
class Case:
    name: str
    what: str
    seconds: list[float] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [n / s for n, s in zip(self.entries, self.seconds, strict=True)]

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)

    def to_obj(self) -> dict:
        return {"what": self.what, "entries": self.entries, "seconds": self.seconds, "entries_per_s": self.rates,
                "median_entries_per_s": self.median_rate, "median_us_per_entry": 1e6 / self.median_rate}


@dataclass(frozen=True)
class Identities:
    sn: pki.Identity
    sl: pki.Identity


def make_identities(cert_dir: Path) -> Identities:
    pki.generate_host_certs(cert_dir, 0, components=("sn",), nodes=[SL_ID])
    layout = pki.CertLayout(cert_dir, 0)
    return Identities(pki.Identity.load(layout.key("sn"), layout.cert("sn"), layout.capath),
                      pki.Identity.load(layout.node_key(SL_ID), layout.node_cert(SL_ID), layout.capath))


def metrics_txs(sl: pki.Identity, count: int) -> list[SignedTx]:
    return [sign_tx(sl, SL_ID, "metrics", {"contract": "default", "node": SL_ID, "loss": 0.5, "epoch": 1})
            for _ in range(count)]


def plain_entries(count: int) -> list[Entry]:
    """A hash-linked run of entries with made-up signatures: stores do not check them."""
    entries, prev = [], GENESIS_PREV_HASH
    for i in range(count):
        tx = Tx(kind="metrics", payload={"contract": "default", "node": SL_ID, "loss": 0.5, "epoch": 1},
                signer=Signer(SL_ID, "ab" * 32), time=time.time())
        entry = Entry(i, prev, tx, signature=secrets.token_bytes(71))
        entries.append(entry)
        prev = entry.hash
    return entries


def timed(run: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    done = run()
    return time.perf_counter() - started, done


def bench_store(path: Path, entries: list[Entry]) -> tuple[float, int]:
    store = SQLiteStore(path)
    try:
        def run() -> int:
            prev = None
            for entry in entries:
                store.append_if_head_is(prev, entry)
                prev = entry.hash
            return len(entries)

        return timed(run)
    finally:
        store.close()


def bench_submit(path: Path, ids: Identities, txs: list[SignedTx]) -> tuple[float, int]:
    chain = Chain(SQLiteStore(path))
    try:
        chain.submit(genesis_tx(ids.sn, "127.0.0.1:30304"))
        chain.submit(sign_tx(ids.sl, SL_ID, "register_node", registration(ids.sl, "127.0.0.1:1")))
        chain.submit(sign_tx(ids.sl, SL_ID, "session_join", {"contract": "default", "node": SL_ID}))

        def run() -> int:
            for signed in txs:
                chain.submit(signed)
            return len(txs)

        return timed(run)
    finally:
        chain.store.close()


def bench_verify(path: Path) -> tuple[float, int]:
    store = SQLiteStore(path, read_only=True)
    try:
        return timed(lambda: verify_store(store).entries)
    finally:
        store.close()


def run(entries: int, repeats: int, work: Path) -> list[Case]:
    ids = make_identities(work / "cert")
    prebuilt = plain_entries(entries)
    signed = metrics_txs(ids.sl, entries)  # one ledger per repeat, so the same signed txs fit each
    store = Case("store", "SQLiteStore.append_if_head_is of pre-built entries")
    submit = Case("submit", "Chain.submit of pre-signed metrics txs (signature + state + store)")
    verify = Case("verify", "verify_store over the submit ledger (hash + link + signature + state)")
    for i in range(repeats):
        for case, result in (
            (store, bench_store(work / f"store-{i}.db", prebuilt)),
            (submit, bench_submit(work / f"submit-{i}.db", ids, signed)),
            (verify, bench_verify(work / f"submit-{i}.db")),
        ):
            case.seconds.append(result[0])
            case.entries.append(result[1])
    return [store, submit, verify]


def table(cases: list[Case]) -> str:
    lines = [f"{'case':<8} {'median entries/s':>17} {'median us/entry':>16}   runs (entries/s)"]
    for case in cases:
        runs = ", ".join(f"{r:,.0f}" for r in case.rates)
        lines.append(f"{case.name:<8} {case.median_rate:>17,.0f} {1e6 / case.median_rate:>16,.1f}   {runs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000, help="entries per case and repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the ledger files go (default: a temporary folder); its disk sets the fsync cost")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.entries < 1 or args.repeats < 1:
        parser.error("--entries and --repeats must be at least 1")

    with tempfile.TemporaryDirectory(prefix="ledger-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"ledger append: {args.entries} entries x {args.repeats} repeats, SQLite {sqlite3.sqlite_version} "
              f"(WAL, synchronous=FULL), files in {work}", flush=True)
        started = time.perf_counter()
        cases = run(args.entries, args.repeats, work)
        total = time.perf_counter() - started

    print(table(cases))
    print(f"total {total:.1f} s")
    results = {
        "benchmark": "ledger_append",
        "entries": args.entries,
        "repeats": args.repeats,
        "dir": str(args.dir or tempfile.gettempdir()),
        "sqlite_version": sqlite3.sqlite_version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "unix_time": time.time(),
        "total_seconds": total,
        "cases": {case.name: case.to_obj() for case in cases},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
