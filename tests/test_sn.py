"""The SN as a user runs it: a real `swarm sn` process, clients over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import threading
import time

import pytest

from conftest import identity, run_swarm, start_sn, wait_until
from swarmlearn.errors import Rejected, SNUnavailable
from swarmlearn.ledger.signatures import sign_tx
from swarmlearn.pki import Identity
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.server import MARKER_FILE
from swarmlearn.sn.server import start_sn as serve_sn
from test_sl_lifecycle import ThreadStarts, _not_grpcs


def client(sn, certs, component="sl", node_id=None, **kwargs) -> SNClient:
    c = SNClient(sn.address, identity(certs, component), node_id, **kwargs)
    c.wait_ready(10)
    return c


def test_register_submit_query_and_watch(sn, certs):
    with client(sn, certs, "sl", "node1") as sl, client(sn, certs, "swci") as swci:
        sl.register("SL", "127.0.0.1:5000")
        swci.register("SWCI")
        swci.submit("contract_create", {"name": "my-contract"})
        sl.submit("session_join", {"contract": "my-contract", "node": "node1", "min_peers": 1})
        sl.heartbeat()

        state = swci.query()
        assert state["nodes"]["node1"]["role"] == "SL"
        assert state["nodes"]["node1"]["address"] == "127.0.0.1:5000"
        assert "node1" in state["contracts"]["my-contract"]["members"]
        assert "node1" in state["last_seen"]
        assert set(swci.query("tasks")) == {"tasks", "last_seen"}

        stop = threading.Event()
        seen = []
        for entry in swci.watch(0, stop):
            seen.append(entry)
            if entry.tx.kind == "session_join":
                stop.set()
        assert [e.tx.kind for e in seen] == ["genesis", "register_node", "register_node", "contract_create",
                                             "session_join"]
        assert [e.index for e in seen] == list(range(5))
        assert seen[1].prev_hash == seen[0].hash
        assert state["info"]["genesis_hash"] == seen[0].hash


def test_registering_again_as_the_same_node_adds_no_entry(sn, certs):
    """Every SWCI connection registers: the ledger grows only when the certificate, address or info changed."""
    with client(sn, certs, "swci") as swci, client(sn, certs, "sl", "node1") as sl:
        first = swci.register("SWCI")
        head = swci.heartbeat()
        assert swci.register("SWCI") == first
        assert swci.heartbeat() == head
        sl.register("SL", "127.0.0.1:5000")
        moved = sl.register("SL", "127.0.0.1:5001")
        assert moved > head and sl.query("nodes")["nodes"]["node1"]["address"] == "127.0.0.1:5001"


def test_watch_delivers_entries_appended_after_it_started(sn, certs):
    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        stop = threading.Event()
        got = []

        def follow():
            for entry in swci.watch(2, stop):
                got.append(entry.tx.payload.get("name"))
                if len(got) == 3:
                    stop.set()

        thread = threading.Thread(target=follow)
        thread.start()
        for name in ("a", "b", "c"):
            swci.submit("contract_create", {"name": name})
        thread.join(10)
        assert got == ["a", "b", "c"]


def test_refused_transaction_comes_back_with_the_reason(sn, certs):
    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        with pytest.raises(Rejected, match="not finalized|no task named"):
            swci.submit("taskrunner_assign", {"runner": "default", "task": "ghost", "peers": 1})


def test_a_node_cannot_submit_in_another_nodes_name(sn, certs):
    with client(sn, certs, "swci") as swci, client(sn, certs, "sl", "node1") as sl:
        swci.register("SWCI")
        forged = sign_tx(identity(certs, "swci"), "swci-1", "contract_create", {"name": "forged"})
        with pytest.raises(Rejected, match="certificate other than the caller"):
            sl.submit_signed(forged)  # the swci's own signature, sent over the SL's connection
        assert "forged" not in swci.query("contracts")["contracts"]


def test_replayed_signed_transaction_adds_nothing(sn, certs):
    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        signed = sign_tx(swci.identity, swci.node_id, "contract_create", {"name": "once"})
        first = swci.submit_signed(signed)
        head = swci.heartbeat()
        assert swci.submit_signed(signed) == first
        assert swci.heartbeat() == head


def test_certificate_from_a_foreign_ca_is_refused_at_the_handshake(sn, certs, foreign_certs, tmp_path):
    both = tmp_path / "both-cas"  # the stranger trusts our CA, but we do not trust theirs
    both.mkdir()
    shutil.copy(certs.ca_cert, both)
    shutil.copy(foreign_certs.ca_cert, both)
    stranger = Identity.load(foreign_certs.node_key("node1"), foreign_certs.node_cert("node1"), both)
    with SNClient(sn.address, stranger, "intruder", unreachable_timeout=2) as c:
        with pytest.raises(SNUnavailable):
            c.wait_ready(2)
        with pytest.raises(SNUnavailable):
            c.query()


def test_unreachable_sn_is_a_clear_error_within_seconds(certs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with SNClient(f"127.0.0.1:{port}", identity(certs, "sl"), "node1", unreachable_timeout=2) as c:
        with pytest.raises(SNUnavailable, match="unreachable|no SN answered"):
            c.query()


def test_kill_9_and_restart_continues_the_same_chain(procs, certs, tmp_path):
    data = tmp_path / "sn"
    sn = start_sn(procs, certs, data)
    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        for i in range(20):
            swci.submit("contract_create", {"name": f"c{i}"})
        before = swci.query()
    sn.proc.kill()

    again = start_sn(procs, certs, data)
    assert "ledger at entry" in again.proc.output
    with client(again, certs, "swci") as swci:
        after = swci.query()
        swci.submit("contract_create", {"name": "after-restart"})
    for section in ("contracts", "tasks", "taskrunners"):
        assert after[section] == before[section]
    assert after["info"]["genesis"] == before["info"]["genesis"]
    again.proc.kill()

    verify = run_swarm("ledger", "verify", str(data))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("OK ")
    # genesis, SWCI, 20 contracts, (the SN re-registers at its new port), one more contract
    assert int(verify.stdout.split()[1]) >= 23


def test_ledger_verify_finds_a_flipped_byte(procs, certs, tmp_path):
    data = tmp_path / "sn"
    sn = start_sn(procs, certs, data)
    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        for i in range(5):
            swci.submit("contract_create", {"name": f"contract-{i}"})
    sn.proc.kill()
    assert run_swarm("ledger", "verify", str(data)).returncode == 0

    db = sqlite3.connect(data / "ledger.db")
    body = bytearray(db.execute("SELECT body FROM entries WHERE idx = 4").fetchone()[0])
    at = body.index(b"contract-")
    body[at] ^= 0x01  # one bit of one byte
    db.execute("UPDATE entries SET body = ? WHERE idx = 4", (bytes(body),))
    db.commit()
    db.close()

    result = run_swarm("ledger", "verify", str(data))
    assert result.returncode == 1
    assert result.stdout.startswith("BAD entry 4:")


def test_ledger_verify_finds_a_rewritten_entry_with_a_fixed_up_hash(procs, certs, tmp_path):
    """Re-hashing an edited entry does not help: the next entry's link and the signature both break."""
    import hashlib

    data = tmp_path / "sn"
    sn = start_sn(procs, certs, data)
    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        swci.submit("contract_create", {"name": "honest"})
        swci.submit("contract_create", {"name": "later"})
    sn.proc.kill()
    db = sqlite3.connect(data / "ledger.db")
    idx = db.execute("SELECT max(idx) FROM entries").fetchone()[0] - 1
    body = db.execute("SELECT body FROM entries WHERE idx = ?", (idx,)).fetchone()[0].replace(b"honest", b"forged")
    db.execute("UPDATE entries SET body = ?, hash = ? WHERE idx = ?", (body, hashlib.sha256(body).hexdigest(), idx))
    db.commit()
    db.close()
    result = run_swarm("ledger", "verify", str(data))
    assert result.returncode == 1 and result.stdout.startswith(f"BAD entry {idx}:")
    assert "signature" in result.stdout


def test_a_watch_that_rides_out_sn_restarts_keeps_one_canceller_thread(procs, certs, tmp_path):
    """Following the ledger across two SN restarts (a dozen reconnection attempts) starts one
    thread to cancel the stream on stop, not one per attempt, and it ends with the watch."""
    sn = start_sn(procs, certs, tmp_path / "sn")
    port = sn.address.rsplit(":", 1)[1]
    stop = threading.Event()
    got: list[int] = []
    with client(sn, certs, "swci") as swci, ThreadStarts() as starts:
        swci.register("SWCI")

        def follow():
            for entry in swci.watch(0, stop):
                got.append(entry.index)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        for name in ("before", "after-first-restart", "after-second-restart"):
            index = swci.submit("contract_create", {"name": name})
            assert wait_until(lambda: index in got, 20.0), f"entry {index} not watched; got {got}"
            if name != "after-second-restart":
                sn.proc.kill()
                time.sleep(1.0)  # the watch retries meanwhile, every half second
                sn = start_sn(procs, certs, sn.data_dir, "--sn-api-port", port)
        stop.set()
        follower.join(5)
    assert got == list(range(len(got)))
    cancellers = [t for t, module in starts.started if module == "swarmlearn.sn.client"]
    assert len(cancellers) == 1, [t.name for t in cancellers]
    assert not follower.is_alive() and not cancellers[0].is_alive()


def test_a_stopped_sn_leaves_no_thread_behind_and_its_marker_holds_its_last_entry(certs, tmp_path):
    """The SN's RPC workers and its marker's writer are its own: stop() ends every one of them, and
    writes swarm.json with the entry appended just before (the writer waits a second between writes)."""
    with ThreadStarts() as starts:
        server = serve_sn(host="127.0.0.1", port=0, identity=identity(certs, "sn"), data_dir=tmp_path / "sn",
                          sentinel=True)
        try:
            with SNClient(server.address, identity(certs, "swci")) as swci:
                swci.wait_ready(10)
                swci.register("SWCI")
                last = swci.submit("contract_create", {"name": "just-before-stop"})
        finally:
            server.stop()
    assert [t.name for t in _not_grpcs(starts.started) if t.is_alive()] == []
    assert json.loads((tmp_path / "sn" / MARKER_FILE).read_text())["head_index"] == last


def test_a_ledger_edited_under_a_running_sn_is_reported_broken_not_unreachable(sn, certs):
    """An entry another writer put in the SN's store that does not verify: queries and submits say
    where the ledger broke and what to do (restore it), instead of "SN unreachable"."""
    from swarmlearn.errors import LedgerError

    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        head = swci.query("info")["info"]["head_index"]
        with sqlite3.connect(sn.data_dir / "ledger.db", timeout=10) as db:
            db.execute("INSERT INTO entries (idx, hash, body) VALUES (?, ?, ?)", (head + 1, "0" * 64, b"{}"))
        for call in (lambda: swci.query("contracts"), lambda: swci.submit("contract_create", {"name": "after"})):
            with pytest.raises(LedgerError) as caught:
                call()
            assert f"ledger broken at entry {head + 1} (" in str(caught.value), caught.value
            assert "restore it from a backup" in str(caught.value) and "unreachable" not in str(caught.value)
