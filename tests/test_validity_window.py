"""Validity windows: a transaction names the last ledger index at which it may be recorded, so that the
ledger forgets its id once that index is past instead of keeping every id forever. A replay inside
the window is refused as already recorded, one after it as expired; transactions of nodes from before
windows (no valid_until) still fold, and their ids are kept for good."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from conftest import identity
from ledger_ids import CONTRACT, genesis_payload, reg, tx
from swarmlearn.errors import AlreadyRecorded, LedgerError, Rejected
from swarmlearn.ledger import LedgerState
from swarmlearn.ledger.entry import Signer, Tx
from swarmlearn.ledger.state import MAX_VALIDITY_WINDOW
from swarmlearn.sn.client import VALIDITY_WINDOW, SNClient


def record(state: LedgerState, transaction: Tx) -> int:
    index = state.head_index + 1
    state.apply_tx(transaction, index)
    state.head_index = index
    return index


def founded() -> LedgerState:
    state = LedgerState()
    for name, kind, payload in [("sn-1", "genesis", genesis_payload()), ("node1", "register_node", reg("node1")),
                                ("node1", "session_join", {"contract": CONTRACT, "node": "node1"})]:
        record(state, tx(name, kind, payload))
    return state


def report(step: int, valid_until: int | None) -> Tx:
    metrics = tx("node1", "metrics", {"contract": CONTRACT, "node": "node1", "kind": "train", "step": step})
    return dataclasses.replace(metrics, valid_until=valid_until)


def test_a_replay_inside_the_window_is_already_recorded_and_after_it_expired():
    state = founded()
    once = report(0, valid_until=state.head_index + 3)
    at = record(state, once)
    with pytest.raises(AlreadyRecorded) as recorded:
        state.check_tx(once)
    assert recorded.value.index == at

    record(state, report(1, None))  # the ledger moves on to the window's last index
    with pytest.raises(AlreadyRecorded):
        state.check_tx(once)
    record(state, report(2, None))
    assert once.id not in state.seen_tx  # forgotten: it can never be recorded again
    with pytest.raises(Rejected, match=f"expired: it was valid until ledger entry {once.valid_until} and the next "
                                       f"entry is {state.head_index + 1}; sign it again"):
        state.check_tx(once)


def test_a_transaction_past_its_window_or_asking_for_too_long_a_one_is_refused():
    state = founded()
    with pytest.raises(Rejected, match="expired"):
        state.check_tx(report(0, valid_until=state.head_index))
    state.check_tx(report(0, valid_until=state.head_index + 1))  # the next index is the last that may take it
    too_long = state.head_index + 1 + MAX_VALIDITY_WINDOW + 1
    with pytest.raises(Rejected, match=f"more than {MAX_VALIDITY_WINDOW} entries past the next one"):
        state.check_tx(report(0, valid_until=too_long))
    state.check_tx(report(0, valid_until=too_long - 1))


def test_replay_protection_holds_only_open_windows_while_old_transactions_are_kept_for_good():
    state = founded()
    window = 50
    old = report(-1, None)  # a node from before windows
    record(state, old)
    for step in range(1000):
        record(state, report(step, valid_until=state.head_index + 1 + window))
    windowed = len(state.seen_tx) - 4  # genesis, registration, join and the old report are windowless
    assert windowed <= window + 1
    assert sum(len(ids) for ids in state.expiring.values()) == windowed
    with pytest.raises(AlreadyRecorded):
        state.check_tx(old)


def test_a_window_is_signed_bytes_and_absent_from_older_transactions():
    signer = Signer("node1", "cd" * 32)
    windowed = Tx("checkin", {"round": 3}, signer, nonce="00" * 16, time=1.5, valid_until=12)
    assert windowed.signing_bytes() == (b'{"kind":"checkin","nonce":"' + b"00" * 16 + b'","payload":{"round":3},'
                                        b'"signer":{"cert_fp":"' + b"cd" * 32 + b'","node":"node1"},"time":1.5,'
                                        b'"valid_until":12}')
    assert Tx.from_bytes(windowed.signing_bytes()) == windowed
    older = dataclasses.replace(windowed, valid_until=None)
    assert b"valid_until" not in older.signing_bytes() and Tx.from_bytes(older.signing_bytes()) == older
    assert older.id != windowed.id
    for bad in (b'"x"', b"-1", b"true", b"1.5", b"null", str(2**63).encode()):
        data = windowed.signing_bytes().replace(b'"valid_until":12', b'"valid_until":' + bad)
        with pytest.raises(LedgerError, match="valid_until must be a ledger index"):
            Tx.from_bytes(data)


def test_a_client_signs_each_transaction_valid_for_its_window_past_the_head_it_saw(sn, certs):
    with SNClient(sn.address, identity(certs, "swci")) as swci:
        swci.register("SWCI")
        first = swci.submit("contract_create", {"name": "windowed"})
        second = swci.submit("contract_create", {"name": "windowed-too"})
        entries = {}
        for entry in swci.watch(first, threading.Event()):
            entries[entry.index] = entry
            if entry.index == second:
                break
    # Each submit's head came from the reply before it (the registration's, then the first submit's).
    assert entries[first].tx.valid_until == first + VALIDITY_WINDOW
    assert entries[second].tx.valid_until == second + VALIDITY_WINDOW
