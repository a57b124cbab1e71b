"""Checkpoints and snapshots: followers start from a recent state the SN vouches for, not entry 0.

The state's snapshot reads back into a state that folds the rest of a real ledger (contracts, tasks,
rounds, metrics) exactly as the original does; the SN writes a checkpoint every N entries and serves
the snapshot of the latest; a follower starts from it and ends with the state a full replay reaches;
a forged snapshot, a checkpoint signed by a stranger and a lying checkpoint are refused; a data dir
written before checkpoints existed still opens."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench.startup import bench_identities, build_ledger
from conftest import RunningSN, identity, identity_args, wait_until
from swarmlearn.errors import Rejected
from swarmlearn.ledger.chain import ChainBroken, ChainVerifier
from swarmlearn.ledger.entry import Entry, SignedTx, sha256_hex
from swarmlearn.ledger.pin import HistoryRefused, Pin
from swarmlearn.ledger.signatures import registration, sign_tx
from swarmlearn.ledger.snapshot import Snapshot, SnapshotError, accept_snapshot
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.state import LedgerState
from swarmlearn.ledger.store import StoredEntry
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.follower import LedgerFollower
from swarmlearn.sn.server import genesis_tx

EVERY = 20  # the SN's checkpoint spacing in these tests


@pytest.fixture(scope="module")
def ledger_rows():
    """A ledger of about 400 entries of a training swarm (tasks, rounds, metrics), a checkpoint every
    50, and the identities that signed it."""
    root = Path(tempfile.mkdtemp(prefix="swarm-snapshot-"))
    ids = bench_identities(root / "certs")
    store = SQLiteStore(root / "ledger.db")
    build_ledger(store, ids, 400, 50)
    rows = store.read_raw()
    store.close()
    return rows, ids


def fold(rows, start: ChainVerifier | None = None, check: bool = False) -> ChainVerifier:
    verifier = start or ChainVerifier(check_checkpoints=check)
    for row in rows:
        verifier.verify_next(row)
    return verifier


# ------------------------------------------------------------------------------ the state's snapshot

@pytest.mark.parametrize("cut", [0, 7, 123, 250, 399])
def test_a_state_read_back_from_its_snapshot_folds_the_rest_of_the_ledger_exactly_as_the_original(ledger_rows, cut):
    rows, _ = ledger_rows
    whole = fold(rows)
    part = fold(rows[:cut + 1])
    copy = LedgerState.from_snapshot(part.state.to_snapshot())
    assert copy == part.state
    resumed = ChainVerifier()
    resumed.start_from(copy, part.signatures.certs)
    fold(rows[cut + 1:], resumed)
    assert resumed.state == whole.state
    assert resumed.snapshot_document() == whole.snapshot_document()
    contract = whole.state.contracts["default-contract"]
    assert len(contract.rounds) > 30 and whole.state.taskrunners["default-runner"].assignment is not None


def test_the_snapshot_bytes_do_not_depend_on_the_order_a_payload_listed_its_keys(ledger_rows):
    rows, ids = ledger_rows
    # The builder folded its own transactions from memory, keys in the order it wrote them; a reader
    # folds the stored bytes, keys sorted: the checkpoints it wrote hold for both.
    checked = fold(rows, check=True)
    assert checked.latest_snapshot.index == checked.last_checkpoint - 1 > 300


def test_a_field_of_the_wrong_type_in_a_snapshot_is_refused_naming_it(ledger_rows):
    rows, _ = ledger_rows
    obj = fold(rows[:100]).state.to_snapshot()
    obj["contracts"]["default-contract"]["current_round"] = "7"
    with pytest.raises(SnapshotError, match=r"contracts\['default-contract'\]\.current_round"):
        LedgerState.from_snapshot(obj)


# ------------------------------------------------------------------------------ checkpoints

def test_a_full_replay_refuses_a_checkpoint_whose_hash_is_not_the_state_it_folded(ledger_rows):
    rows, ids = ledger_rows
    verifier = fold(rows[:60])
    lie = sign_tx(ids["sn"], ids["sn"].name, "checkpoint", {"index": 59, "state_hash": "ab" * 32})
    entry = Entry(60, verifier.state.head_hash, lie.tx, lie.signature)
    forged = StoredEntry(60, entry.hash, entry.body_bytes())
    assert fold(rows[:60], check=False).verify_next(forged)  # a follower from a snapshot cannot tell
    with pytest.raises(ChainBroken, match="the SNs disagree on the ledger's state"):
        fold(rows[:60], check=True).verify_next(forged)


def test_only_an_sn_checkpoints_and_only_the_state_at_the_head(ledger_rows):
    rows, ids = ledger_rows
    state = fold(rows[:60]).state
    node = ids["node1"]
    with pytest.raises(Rejected, match="may be submitted by sn only"):
        state.check_tx(sign_tx(node, node.name, "checkpoint", {"index": 59, "state_hash": "ab" * 32}).tx)
    with pytest.raises(Rejected, match="only the state at the head"):
        state.check_tx(sign_tx(ids["sn"], ids["sn"].name, "checkpoint", {"index": 40, "state_hash": "ab" * 32}).tx)


# ------------------------------------------------------------------------------ accepting a snapshot

def served(rows) -> Snapshot:
    """The snapshot an SN that folded `rows` would serve."""
    return fold(rows, check=True).latest_snapshot


def test_a_snapshot_is_accepted_when_its_checkpoint_is_an_sn_of_our_ca_naming_its_hash(ledger_rows):
    rows, ids = ledger_rows
    snap = served(rows)
    state, certs = accept_snapshot(snap, ids["swop"].cas, LedgerState)
    assert state.head_index == snap.index > 300 and ids["node1"].fingerprint in certs


def test_a_snapshot_altered_in_one_byte_is_refused(ledger_rows):
    rows, ids = ledger_rows
    snap = served(rows)
    altered = replace(snap, data=snap.data.replace(b'"current_round":', b'"current_round":1', 1))
    with pytest.raises(SnapshotError, match="no checkpoint of the snapshot received"):
        accept_snapshot(altered, ids["swop"].cas, LedgerState)


def test_a_checkpoint_of_an_sn_whose_ca_we_do_not_trust_is_refused(ledger_rows, foreign_certs):
    rows, ids = ledger_rows
    with pytest.raises(SnapshotError, match="no CA of this node"):
        accept_snapshot(served(rows), identity(foreign_certs, "swop").cas, LedgerState)


def test_a_snapshot_signed_by_a_training_node_is_refused(ledger_rows):
    rows, ids = ledger_rows
    snap = served(rows)
    entry = snap.checkpoint.entry()
    node = ids["node1"]
    resigned = sign_tx(node, node.name, "checkpoint", entry.tx.payload)
    forged = Entry(entry.index, entry.prev_hash, resigned.tx, resigned.signature)
    snap = replace(snap, checkpoint=StoredEntry(forged.index, forged.hash, forged.body_bytes()))
    with pytest.raises(SnapshotError, match="not an SN's"):
        accept_snapshot(snap, ids["swop"].cas, LedgerState)


# ------------------------------------------------------------------------------ SN and followers

def checkpointing_sn(procs, certs, data_dir: Path):
    """A sentinel SN that writes a checkpoint every EVERY entries."""
    proc = procs.swarm("sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0",
                       *identity_args(certs, "sn"), "--data-dir", str(data_dir),
                       env={"SWARM_CHECKPOINT_EVERY": str(EVERY)})
    line = proc.wait_for_line("SN ready on ")
    return RunningSN(proc, line.split("SN ready on ")[1].split()[0], data_dir)


def client(sn, certs, component="sl", node="node1") -> SNClient:
    c = SNClient(sn.address, identity(certs, component, node))
    c.wait_ready(10)
    return c


def grow(sn, certs, entries: int) -> int:
    """Has node1 join the default contract (once) and report metrics until the ledger holds `entries`
    more entries; returns the head."""
    with client(sn, certs) as sl:
        sl.register("sl")
        nodes = sl.query("contracts")["contracts"]
        contract = next(iter(nodes.values()))
        if "node1" not in contract["members"]:
            sl.submit("session_join", {"contract": "default", "node": "node1"})
        head = sl.query("info")["info"]["head_index"]
        target = head + entries
        step = 0
        while head < target:
            step += 1
            head = sl.submit("metrics", {"contract": "default", "node": "node1", "kind": "train", "loss": 1.0 / step})
        return sl.query("info")["info"]["head_index"]


def follow(sn, certs, pin=None, **kwargs) -> LedgerFollower:
    follower = LedgerFollower(client(sn, certs, "swop"), pin, **kwargs)
    follower.start()
    return follower


def caught_up(follower: LedgerFollower, head: int) -> None:
    try:
        assert follower.wait_until(lambda s: s.head_index >= head, timeout=30), "follower did not catch up"
    finally:
        follower.stop()
        follower.sn.close()
    assert follower.error is None


def test_a_follower_starts_from_the_sns_snapshot_and_ends_where_a_full_replay_ends(procs, certs, tmp_path):
    sn = checkpointing_sn(procs, certs, tmp_path / "sn")
    head = grow(sn, certs, 3 * EVERY + 5)
    quick, full = follow(sn, certs), follow(sn, certs, full_replay=True)
    caught_up(quick, head)
    caught_up(full, head)
    assert quick.started_from is not None and quick.started_from >= 2 * EVERY
    assert full.started_from is None
    assert quick.verifier.snapshot_document() == full.verifier.snapshot_document()
    assert full.verifier.last_checkpoint > 2 * EVERY  # the replay checked the checkpoints on its way


def test_a_pinned_entry_before_the_snapshot_is_checked_and_another_history_refused(procs, certs, tmp_path):
    sn = checkpointing_sn(procs, certs, tmp_path / "sn")
    first = follow(sn, certs, tmp_path / "pin.json")
    caught_up(first, grow(sn, certs, 3))
    pinned = Pin(**json.loads((tmp_path / "pin.json").read_text()))
    head = grow(sn, certs, 2 * EVERY + 5)
    again = follow(sn, certs, tmp_path / "pin.json")
    caught_up(again, head)
    assert again.started_from is not None and again.started_from > pinned.head_index
    # A pin that names another entry at its index: the snapshot's history does not hold it.
    (tmp_path / "lie.json").write_text(json.dumps(asdict(replace(pinned, head_hash="0" * 64))))
    liar = follow(sn, certs, tmp_path / "lie.json")
    assert wait_until(lambda: liar.error is not None, 30)
    liar.stop()
    liar.sn.close()
    assert isinstance(liar.error, HistoryRefused) and liar.state.head_index < 0


def write_old_data_dir(certs, data_dir: Path) -> int:
    """An SN data dir as SNs wrote it before checkpoints: ledger.db with the one `entries` table (made
    here with sqlite3 and the schema of that time), a genesis, registrations and a session; no marker."""
    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / "ledger.db")
    db.execute("CREATE TABLE entries (idx INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, body BLOB NOT NULL)")
    sn_id, node = identity(certs, "sn"), identity(certs, "sl", "node1")
    signed: list[SignedTx] = [genesis_tx(sn_id, "127.0.0.1:1"),
                              sign_tx(node, "node1", "register_node", registration(node, "")),
                              sign_tx(node, "node1", "session_join", {"contract": "default", "node": "node1"})]
    signed += [sign_tx(node, "node1", "metrics", {"contract": "default", "node": "node1", "loss": 1.0 / i})
               for i in range(1, 6)]
    verifier, prev = ChainVerifier(), None
    for index, s in enumerate(signed):
        entry = Entry(index, prev or "0" * 64, s.tx, s.signature)
        row = StoredEntry(index, entry.hash, entry.body_bytes())
        verifier.verify_next(row)
        db.execute("INSERT INTO entries (idx, hash, body) VALUES (?, ?, ?)", (index, row.hash, row.body))
        prev = entry.hash
    db.commit()
    db.close()
    return len(signed) - 1


def test_a_data_dir_written_before_checkpoints_opens_and_gains_them(procs, certs, tmp_path):
    old_head = write_old_data_dir(certs, tmp_path / "old")
    sn = checkpointing_sn(procs, certs, tmp_path / "old")
    early = follow(sn, certs)
    caught_up(early, old_head)
    assert early.started_from is None  # nothing to start from yet: it folded from entry 0
    head = grow(sn, certs, EVERY + 5)
    later = follow(sn, certs)
    caught_up(later, head)
    assert later.started_from is not None and later.started_from > old_head
    assert sha256_hex(later.verifier.snapshot_document()[0]) == later.verifier.snapshot_document()[1]
