"""Golden vectors: the bytes and orders every node of a swarm must compute alike. A change to the hash
recipe, the canonical JSON or the leader order would split a swarm of mixed versions while every
other test passed (they compute both sides with the same code); these values are pinned, and a
change to any of them must come with a new ledger/model.PROTOCOL_VERSION. A ledger of the previous
protocol keeps folding to the state hashes its checkpoints carry (tests/test_state_bounded.py folds
one written by the last release of protocol 2)."""

from __future__ import annotations

import hashlib

import pytest

from ledger_ids import genesis_payload, tx
from swarmlearn.errors import Rejected
from swarmlearn.ledger import LedgerState, snapshot
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, Signer, Tx, canonical_json
from swarmlearn.ledger.model import (OLDEST_PROTOCOL, PROTOCOL_VERSION, Checkin, Contract, Round, RoundStatus,
                                     leader_order)

CHECKIN = Tx("checkin", {"contract": "c", "round": 3, "node": "node1", "hash": "ab" * 32, "weight": 12.5, "size": 1024,
                         "final": False},
             Signer("node1", "cd" * 32), nonce="00112233445566778899aabbccddeeff", time=1764547200.25)
# The canonical form, written out by hand: sorted keys, no spaces, UTF-8.
CHECKIN_BYTES = (b'{"kind":"checkin","nonce":"00112233445566778899aabbccddeeff","payload":{"contract":"c",'
                 b'"final":false,"hash":"' + b"ab" * 32 + b'","node":"node1","round":3,"size":1024,"weight":12.5},'
                 b'"signer":{"cert_fp":"' + b"cd" * 32 + b'","node":"node1"},"time":1764547200.25}')


def test_a_transaction_is_signed_and_identified_by_its_canonical_bytes():
    assert CHECKIN.signing_bytes() == CHECKIN_BYTES
    assert CHECKIN.id == hashlib.sha256(CHECKIN_BYTES).hexdigest()
    assert CHECKIN.id == "5f4dfa6ad3868f9826a2400c138b8a8a1e25f9bc546351c41b9164935d35f6ad"


def test_an_entry_hash_covers_index_link_transaction_and_signature():
    entry = Entry(7, "ef" * 32, CHECKIN, bytes(range(8)))
    body = (b'{"index":7,"prev_hash":"' + b"ef" * 32 + b'","signature":"AAECAwQFBgc=","tx":' + CHECKIN_BYTES + b"}")
    assert entry.body_bytes() == body
    assert entry.hash == "0da2333daa611ef328c7229763a70564f419524b0e1f40f421983d0cdd15d678"


@pytest.mark.parametrize("contract,generation,round_no,nodes,order", [
    ("defaultbb.cqdb.sml.hpe", 0, 1, ["node1", "node2", "node3"], ["node1", "node3", "node2"]),
    ("defaultbb.cqdb.sml.hpe", 2, 9, ["alice", "node3", "node2", "node1"], ["node1", "node2", "node3", "alice"]),
])
def test_leader_order_is_pinned(contract, generation, round_no, nodes, order):
    assert leader_order(contract, generation, round_no, nodes) == order
    # and is the SHA-256 recipe it says it is
    rank = {n: hashlib.sha256(f"{contract}|{generation}|{round_no}|{n}".encode()).hexdigest() for n in nodes}
    assert order == sorted(nodes, key=lambda n: (rank[n], n))


def test_a_ledger_of_another_protocol_is_refused_naming_both():
    for other in (0, OLDEST_PROTOCOL - 1, PROTOCOL_VERSION + 1):
        with pytest.raises(Rejected, match=f"founded by swarmlearn protocol {other}, this node speaks protocol "
                                           f"{PROTOCOL_VERSION}"):
            LedgerState().check_tx(tx("sn-1", "genesis", {**genesis_payload(), "protocol": other}))
    LedgerState().check_tx(tx("sn-1", "genesis", genesis_payload()))


def test_a_ledger_of_the_previous_protocol_is_still_folded_by_its_own_rules():
    assert (OLDEST_PROTOCOL, PROTOCOL_VERSION) == (2, 4)
    for older in (2, 3):
        state = LedgerState()
        state.apply(Entry(0, GENESIS_PREV_HASH, tx("sn-1", "genesis", {**genesis_payload(), "protocol": older}), b"s"))
        assert state.protocol == older


# A contract with one merged round, as the snapshot encodes it. Protocol 3 added the round counters,
# protocol 4 a round's `secure` phases and the contract's chosen merge method; an older state's snapshot
# leaves them out, so its checkpoints keep their hashes.
CONTRACT = Contract("c", "swci-1", rounds={1: Round(1, {"node1": Checkin("ab" * 32, 1.0, 10)}, RoundStatus.MERGED,
                                                    ["node1"], ["node1"], "node1", merged_hash="cd" * 32)},
                    latest_merged_round=1, rounds_merged=1)


@pytest.mark.parametrize("protocol,digest", [
    (2, "62ee1aa38fb5e21502d6c894434d9ac4818f33bca4cf002cbada0ff0c84d9bab"),  # as the last protocol-2 release did
    (3, "5f3bda7f94184ff34d4feb3fff33a51e9ec6be276dcc6aeeb4251ca177c7779a"),  # as the last protocol-3 release did
    (4, "06c3ec4585c5504c0a9333036a010ccfb43eedc553b1a65cea10d8f33603d3ae"),
])
def test_the_snapshot_encoding_of_a_contract_is_pinned_per_protocol(protocol, digest):
    encoded = canonical_json(snapshot.encode(CONTRACT, Contract, protocol))
    assert (b'"rounds_merged":1' in encoded) == (protocol >= 3)
    assert (b'"chosen_merge_method":null' in encoded and b'"secure":null' in encoded) == (protocol >= 4)
    assert hashlib.sha256(encoded).hexdigest() == digest
