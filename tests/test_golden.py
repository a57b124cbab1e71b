"""Golden vectors: the bytes and orders every node of a swarm must compute alike. A change to the hash
recipe, the canonical JSON or the leader order would split a swarm of mixed versions while every
other test passed (they compute both sides with the same code); these values are pinned, and a
change to any of them must come with a new ledger/model.PROTOCOL_VERSION."""

from __future__ import annotations

import hashlib

import pytest

from ledger_ids import genesis_payload, tx
from swarmlearn.errors import Rejected
from swarmlearn.ledger import LedgerState
from swarmlearn.ledger.entry import Entry, Signer, Tx
from swarmlearn.ledger.model import PROTOCOL_VERSION, leader_order

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
    for other in (0, PROTOCOL_VERSION + 1):
        with pytest.raises(Rejected, match=f"founded by swarmlearn protocol {other}, this node speaks protocol "
                                           f"{PROTOCOL_VERSION}"):
            LedgerState().check_tx(tx("sn-1", "genesis", {**genesis_payload(), "protocol": other}))
    LedgerState().check_tx(tx("sn-1", "genesis", genesis_payload()))
