"""History cannot be silently erased or replaced (issue 11, part 7), as an attacker with the SN's disk
would try it: empty ledger.db, cut its last rows, or serve another swarm in its place.

- the sentinel refuses to found a new swarm in a data dir that held a ledger, unless --new-swarm;
- an SN, and `swarm ledger verify`, refuse a ledger shorter than what the SN acknowledged (swarm.json);
- a follower (what SL and SWOP run) refuses an SN whose ledger is shorter than, or has another genesis
  than, what it verified and pinned, and an entry whose signature does not verify.

Real `swarm sn` processes over mutual TLS on 127.0.0.1; followers run in the test's process.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from conftest import RunningSN, identity, identity_args, run_swarm, start_sn
from swarmlearn.errors import LedgerError
from swarmlearn.ledger.chain import ChainBroken, ChainVerifier
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry
from swarmlearn.ledger.pin import PIN_FILE
from swarmlearn.ledger.store import StoredEntry
from swarmlearn.sn.follower import LedgerFollower
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.server import LEDGER_FILE, MARKER_FILE, genesis_tx
from swarmlearn.swci.script import parse_line
from swarmlearn.swci.session import SwciSession
from test_swop_swci import make_project, start_swop


def grow(sn: RunningSN, certs, contracts: int) -> int:
    """Adds entries the way a SWCI does; returns the ledger's last index."""
    with SNClient(sn.address, identity(certs, "swci")) as swci:
        swci.wait_ready(10)
        index = swci.register("SWCI")
        for n in range(contracts):
            index = swci.submit("contract_create", {"name": f"contract-{time.monotonic_ns()}-{n}"})
    return index


def stop(sn: RunningSN) -> None:
    """Stops the SN as a user does (SIGTERM), so that it records its head in swarm.json on the way out."""
    sn.proc.kill(signal.SIGTERM)


def restart(procs, certs, sn: RunningSN, *extra: str) -> RunningSN:
    """The SN started again on its data dir and port, so that its followers reconnect on their own."""
    port = sn.address.rsplit(":", 1)[1]
    proc = procs.swarm("sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", port,
                       *identity_args(certs, "sn"), "--data-dir", str(sn.data_dir), *extra)
    proc.wait_for_line("SN ready on ")
    return RunningSN(proc, sn.address, sn.data_dir)


def sn_refuses(certs, data_dir: Path, *extra: str) -> str:
    """Starts `swarm sn` on data_dir, expecting a refusal: exit 1 and one error line, returned."""
    done = run_swarm("sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0", *identity_args(certs, "sn"),
                     "--data-dir", str(data_dir), *extra)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def delete_rows_after(data_dir: Path, index: int) -> None:
    db = sqlite3.connect(data_dir / LEDGER_FILE)
    with db:
        db.execute("DELETE FROM entries WHERE idx > ?", (index,))
    db.close()


def follower(sn: RunningSN, certs, pin: Path | None) -> LedgerFollower:
    """What SL and SWOP run, without the rest of them: SWOP's certificate, its own pin file."""
    f = LedgerFollower(SNClient(sn.address, identity(certs, "swop")), pin)
    f.start()
    return f


def refusal(f: LedgerFollower, timeout: float = 20.0) -> LedgerError:
    deadline = time.monotonic() + timeout
    while f.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(f.error, LedgerError), f"follower did not refuse the SN: {f.error!r}"
    return f.error


def test_sentinel_refuses_to_found_a_new_swarm_over_an_emptied_ledger(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    last = grow(sn, certs, 2)
    stop(sn)
    marker = json.loads((sn.data_dir / MARKER_FILE).read_text())
    assert marker["head_index"] == last

    # Every row deleted: the marker still names the swarm, so nothing new is founded over it.
    delete_rows_after(sn.data_dir, -1)
    line = sn_refuses(certs, sn.data_dir)
    assert f"{LEDGER_FILE} holds no entries" in line and MARKER_FILE in line and "--new-swarm" in line, line
    done = run_swarm("ledger", "verify", str(sn.data_dir))
    assert done.returncode == 1 and "holds no entries" in done.stdout, done.stdout + done.stderr

    # The marker deleted too and ledger.db truncated to nothing: the file itself is the trace.
    (sn.data_dir / MARKER_FILE).unlink()
    (sn.data_dir / LEDGER_FILE).write_bytes(b"")
    line = sn_refuses(certs, sn.data_dir)
    assert "traces of an earlier ledger (ledger.db" in line and "--new-swarm" in line, line

    # Only an explicit --new-swarm founds a new swarm there, and records it.
    again = start_sn(procs, certs, sn.data_dir, "--new-swarm")
    assert "ledger at entry 0" in again.proc.output
    stop(again)
    assert json.loads((sn.data_dir / MARKER_FILE).read_text())["genesis_hash"] != marker["genesis_hash"]


def test_truncated_ledger_is_refused_by_sn_and_verify(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    last = grow(sn, certs, 4)
    stop(sn)
    done = run_swarm("ledger", "verify", str(sn.data_dir))
    assert done.returncode == 0 and done.stdout.startswith(f"OK {last + 1} entries"), done.stdout + done.stderr

    delete_rows_after(sn.data_dir, last - 3)
    line = sn_refuses(certs, sn.data_dir)
    assert f"{LEDGER_FILE} ends at entry {last - 3}, short of entry {last} that this SN (per " in line, line
    done = run_swarm("ledger", "verify", str(sn.data_dir / LEDGER_FILE))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"ends at entry {last - 3}, short of entry {last} that this SN" in done.stdout, done.stdout


def test_follower_refuses_an_sn_whose_chain_is_shorter_than_it_verified(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    usr = make_project(tmp_path, certs)
    swop = start_swop(procs, certs, sn, usr)
    swci = SwciSession(identity(certs, "swci"), usr / "swci", out=lambda line: None)
    assert swci.execute(parse_line(f"CREATE CONTEXT c WITH IP {sn.address.replace(':', ' ')}", 1))
    swci.close()
    swci_saw = json.loads((usr / "swci" / ".swarm" / PIN_FILE).read_text())["head_index"]
    last = grow(sn, certs, 4)
    pin = tmp_path / "swop" / PIN_FILE
    live = follower(sn, certs, pin)
    try:
        live.wait_index(last, timeout=20)
        stop(sn)
        # The SN's operator cuts the last entries and removes the marker that would give it away.
        delete_rows_after(sn.data_dir, swci_saw - 1)
        (sn.data_dir / MARKER_FILE).unlink()
        restart(procs, certs, sn)

        # Connected across the restart: refused at the reconnection.
        line = str(refusal(live))
        assert f"the ledger SN {sn.address} serves ends at entry " in line, line
        assert f"short of entry {last} that this node verified: history was rolled back" in line, line
    finally:
        live.stop()
    assert json.loads(pin.read_text())["head_index"] == last

    # A SWOP process (SL likewise) stops, exits non-zero and says why in its last line.
    assert swop.popen.wait(timeout=30) == 1, swop.output
    swop.wait_for_line(f"short of entry {last} that this node verified")
    swop._thread.join(timeout=5)
    assert swop.lines[-1].startswith("error: SWOP swop-1 stopped: it lost the ledger: ") \
        and f"short of entry {last} that this node verified" in swop.lines[-1], swop.output

    # Started again (an SL or SWOP restarted), or a SWCI run again: refused from its pin.
    again = follower(sn, certs, pin)
    try:
        line = str(refusal(again))
        assert f"short of entry {last} that this node verified" in line and str(pin) in line, line
    finally:
        again.stop()
    said = []
    swci = SwciSession(identity(certs, "swci"), usr / "swci", out=said.append)
    assert not swci.execute(parse_line(f"CREATE CONTEXT c WITH IP {sn.address.replace(':', ' ')}", 1))
    swci.close()
    assert swci.exited and "history was rolled back" in said[-1], said


def test_follower_refuses_an_sn_with_another_genesis(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    last = grow(sn, certs, 1)
    pin = tmp_path / "sl" / PIN_FILE
    f = follower(sn, certs, pin)
    f.wait_index(last, timeout=20)
    f.stop()
    genesis = json.loads(pin.read_text())["genesis_hash"]

    # Another swarm, longer than what the node verified, answers in its place.
    other = start_sn(procs, certs, tmp_path / "other")
    grow(other, certs, 3)
    f = follower(other, certs, pin)
    try:
        line = str(refusal(f))
    finally:
        f.stop()
    assert f"the ledger SN {other.address} serves begins with another genesis" in line and genesis[:12] in line, line
    assert f.state.head_index == -1  # nothing of the other swarm was taken in


class EntriesSN:
    """Stands in for an SNClient: streams the given rows as an SN's Watch would."""

    address = "127.0.0.1:0 (test)"

    def __init__(self, rows: list[StoredEntry]):
        self.rows = rows

    def watch(self, from_index, stop: threading.Event, raw=False, on_connect=None, background=None):
        if on_connect is not None:
            on_connect(len(self.rows) - 1)
        yield from self.rows[from_index:]
        stop.wait()


def as_row(entry: Entry) -> StoredEntry:
    return StoredEntry(entry.index, entry.hash, entry.body_bytes())


def test_follower_refuses_entry_with_bad_signature(certs):
    signed = genesis_tx(identity(certs, "sn"), "127.0.0.1:30304")
    genesis = Entry(0, GENESIS_PREV_HASH, signed.tx, signed.signature)
    ChainVerifier().verify_next(as_row(genesis))  # as signed, it verifies

    # The SN rewrites the signature and the hash that covers it: the links and hash check out.
    forged = Entry(0, GENESIS_PREV_HASH, signed.tx, bytes([signed.signature[0] ^ 1]) + signed.signature[1:])
    with pytest.raises(ChainBroken, match="signature of genesis .* does not verify"):
        ChainVerifier().verify_next(as_row(forged))

    f = LedgerFollower(EntriesSN([as_row(forged)]))
    f.start()
    try:
        error = refusal(f, timeout=5)
        assert f.failure(0) is error  # what `swarm sl` and `swarm swop` watch to stop and exit non-zero
    finally:
        f.stop()
    assert isinstance(error, ChainBroken) and error.index == 0
    assert f.state.head_index == -1
