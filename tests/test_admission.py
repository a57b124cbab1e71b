"""Admission: who may talk to the swarm, and in whose name. Real `swarm sn`/`swarm sl` processes, real
certificates from gen-cert, mutual TLS on 127.0.0.1, and the SN's gRPC API called directly so that
each refusal is seen with its status code and message.

Already covered elsewhere and not repeated: the SN refusing a foreign CA at the handshake and a
client's forged submission (tests/test_sn.py), `swarm sl` with untrusted certificates
(tests/test_sl_bad_input.py), a peer serving bytes that do not match its ledger hash
(tests/test_swarm_failures.py).
"""

from __future__ import annotations

import shutil
import time

import grpc
import pytest

from conftest import identity, identity_args, run_swarm, start_sn
from swarm_harness import start_sl
from swarmlearn.ledger.entry import Signer, SignedTx, Tx
from swarmlearn.ledger.signatures import registration, sign_tx
from swarmlearn.pki import Identity
from swarmlearn.proto import sl_pb2, sl_pb2_grpc, sn_pb2, sn_pb2_grpc
from swarmlearn.sl.transport import FetchError, PeerFetcher
from swarmlearn.sn.client import SNClient

CONTRACT = "admitted-only"


def stranger(certs, foreign_certs, tmp_path) -> Identity:
    """A foreign CA's SL identity that itself trusts our CA too: only our side's refusal can stop it."""
    both = tmp_path / "both-cas"
    both.mkdir(exist_ok=True)
    shutil.copy(certs.ca_cert, both)
    shutil.copy(foreign_certs.ca_cert, both)
    return Identity.load(foreign_certs.node_key("node1"), foreign_certs.node_cert("node1"), both)


class RawSN:
    """The SN API over one mTLS connection, without the client's retries and translations."""

    def __init__(self, address: str, ident: Identity):
        self.identity = ident
        self.channel = grpc.secure_channel(address, ident.channel_credentials())
        self.stub = sn_pb2_grpc.SwarmNetworkStub(self.channel)

    def submit(self, signed: SignedTx) -> grpc.RpcError | sn_pb2.SubmitReply:
        request = sn_pb2.SignedTx(tx=signed.tx.signing_bytes(), signature=signed.signature)
        return self.submit_raw(request.SerializeToString())

    def submit_raw(self, body: bytes):
        try:
            return sn_pb2.SubmitReply.FromString(self.channel.unary_unary(
                "/swarmlearn.sn.SwarmNetwork/Submit")(body, timeout=10))
        except grpc.RpcError as exc:
            return exc

    def head(self) -> int:
        return self.stub.Query(sn_pb2.QueryRequest(section="info"), timeout=10).head_index

    def close(self) -> None:
        self.channel.close()


def refused(result, code: grpc.StatusCode, *fragments: str) -> None:
    assert isinstance(result, grpc.RpcError), f"accepted: {result}"
    assert result.code() == code, f"{result.code().name}: {result.details()}"
    for fragment in fragments:
        assert fragment in result.details(), result.details()


# ----------------------------------------------------------------------------- (a) foreign CAs


@pytest.mark.slow
def test_an_sl_peer_port_refuses_a_foreign_ca_and_an_sl_refuses_a_foreign_peer(procs, certs, foreign_certs,
                                                                               tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    start_sl(procs, certs, sn, "node1", tmp_path)
    with SNClient(sn.address, identity(certs, "swci")) as c:
        peer_address = c.query("nodes")["nodes"]["node1"]["address"]
    fetch = sl_pb2.FetchRequest(hash="0" * 64)

    # Our own certificate gets through the handshake, but a blob of no round it took part in is not
    # its to have (nor to learn whether it exists).
    ours = grpc.secure_channel(peer_address, identity(certs, "sl", "node2").channel_credentials())
    with pytest.raises(grpc.RpcError) as answered:
        list(sl_pb2_grpc.SwarmPeerStub(ours).Fetch(fetch, timeout=5))
    assert answered.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "served only to the SLs that checked in to its round" in answered.value.details()
    # Nor may it wait here for a round's merged model (a long poll holding a stream slot and a thread)
    # unless it checked in to that round: refused at once, however long it asks to wait.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as answered:
        list(sl_pb2_grpc.SwarmPeerStub(ours).FetchMerged(
            sl_pb2.MergedRequest(contract="default", round=1, wait_seconds=60), timeout=30))
    assert answered.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "served here only to that round's participants" in answered.value.details()
    assert time.monotonic() - started < 10, "the refusal waited as if for the model"
    ours.close()

    # A foreign CA's certificate never gets a connection: no RPC reaches the service.
    theirs = grpc.secure_channel(peer_address, stranger(certs, foreign_certs, tmp_path).channel_credentials())
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(theirs).result(timeout=2)
    with pytest.raises(grpc.RpcError) as handshake:
        list(sl_pb2_grpc.SwarmPeerStub(theirs).Fetch(fetch, timeout=3))
    assert handshake.value.code() == grpc.StatusCode.UNAVAILABLE
    theirs.close()

    # The other direction: an impostor serving blobs with a foreign certificate is not fetched from.
    from concurrent import futures

    from swarmlearn.sl.transport import BlobStore, PeerService

    blobs = BlobStore()
    digest = blobs.put(b"poisoned tensors")
    impostor = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sl_pb2_grpc.add_SwarmPeerServicer_to_server(PeerService(blobs), impostor)
    port = impostor.add_secure_port("127.0.0.1:0", stranger(certs, foreign_certs, tmp_path).server_credentials())
    impostor.start()
    fetcher = PeerFetcher(identity(certs, "sl"))
    try:
        with pytest.raises(FetchError, match="UNAVAILABLE"):
            fetcher.fetch(f"127.0.0.1:{port}", digest, timeout=3)
    finally:
        fetcher.close()
        impostor.stop(0)


# ------------------------------------------------------------- (b) a contract's admitted peers


@pytest.mark.slow
def test_a_node_of_this_swarm_outside_a_contracts_peers_cannot_join_or_check_in(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    insider = RawSN(sn.address, identity(certs, "sl", "node1"))
    outsider = RawSN(sn.address, identity(certs, "sl", "node9"))
    script = tmp_path / "swci" / "swci-init"
    script.parent.mkdir()
    script.write_text(f"EXIT ON FAILURE ON\nCREATE CONTEXT local WITH IP {sn.address.replace(':', ' ')}\n"
                      f"SWITCH CONTEXT local\nCREATE CONTRACT {CONTRACT} WITH PEERS node1,node2\n")
    made = run_swarm("swci", "--usr-dir", str(script.parent), "--init-script-name", script.name,
                     *identity_args(certs, "swci"), "--sn-api-port", sn.address.rsplit(":", 1)[1])
    assert made.returncode == 0, made.stdout + made.stderr
    try:
        for raw, node in ((insider, "node1"), (outsider, "node9")):
            assert not isinstance(raw.submit(sign_tx(raw.identity, node, "register_node",
                                                     registration(raw.identity, ""))), grpc.RpcError)

        def as_(raw, node, kind, payload):
            return raw.submit(sign_tx(raw.identity, node, kind, payload))

        checkin = {"contract": CONTRACT, "round": 1, "hash": "ab" * 32, "weight": 1, "size": 10}
        head = outsider.head()
        refused(as_(outsider, "node9", "session_join", {"contract": CONTRACT, "node": "node9", "min_peers": 1}),
                grpc.StatusCode.FAILED_PRECONDITION, "node9 is not among the peers of contract admitted-only")
        refused(as_(outsider, "node9", "checkin", {**checkin, "node": "node9"}),
                grpc.StatusCode.FAILED_PRECONDITION, "node9 is not among the peers of contract admitted-only")
        assert outsider.head() == head  # nothing of it reached the ledger

        # The same steps by an admitted node go through, and the outsider still cannot slip in.
        assert not isinstance(as_(insider, "node1", "session_join",
                                  {"contract": CONTRACT, "node": "node1", "min_peers": 1}), grpc.RpcError)
        assert not isinstance(as_(insider, "node1", "checkin", {**checkin, "node": "node1"}), grpc.RpcError)
        refused(as_(outsider, "node9", "checkin", {**checkin, "round": 2, "node": "node9"}),
                grpc.StatusCode.FAILED_PRECONDITION, "not among the peers")
        with SNClient(sn.address, identity(certs, "swci")) as swci:
            contract = swci.query("contracts")["contracts"][CONTRACT]
        assert contract["peers"] == ["node1", "node2"] and list(contract["members"]) == ["node1"]
    finally:
        insider.close()
        outsider.close()


# ---------------------------------------------------------------------- (c) replay, (d) impersonation


@pytest.mark.slow
def test_a_replayed_old_transaction_is_refused_even_after_a_restart(procs, certs, tmp_path):
    data = tmp_path / "sn"
    sn = start_sn(procs, certs, data)
    raw = RawSN(sn.address, identity(certs, "swci"))
    raw.submit(sign_tx(raw.identity, "swci-1", "register_node", registration(raw.identity, "")))
    old = sign_tx(raw.identity, "swci-1", "contract_create", {"name": "once"})
    first = raw.submit(old)
    for i in range(3):  # the ledger moves on; the old bytes are replayed later
        raw.submit(sign_tx(raw.identity, "swci-1", "contract_create", {"name": f"later-{i}"}))
    head = raw.head()
    replay = raw.submit(old)
    refused(replay, grpc.StatusCode.ALREADY_EXISTS, "already recorded at entry", "a replay adds nothing")
    assert dict(replay.trailing_metadata())["swarm-entry-index"] == str(first.index)
    assert raw.head() == head
    raw.close()

    sn.proc.kill()
    again = start_sn(procs, certs, data)
    raw = RawSN(again.address, identity(certs, "swci"))
    head = raw.head()
    refused(raw.submit(old), grpc.StatusCode.ALREADY_EXISTS, "a replay adds nothing")
    # Replayed over another node's connection it is not even considered: the caller did not sign it.
    other = RawSN(again.address, identity(certs, "sl"))
    refused(other.submit(old), grpc.StatusCode.PERMISSION_DENIED, "a node may only submit its own transactions")
    assert raw.head() == head
    raw.close()
    other.close()


@pytest.mark.slow
def test_a_node_cannot_append_in_another_nodes_name(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    alice = RawSN(sn.address, identity(certs, "sl", "alice"))  # two nodes of one organization
    bob = RawSN(sn.address, identity(certs, "sl", "bob"))
    for raw, node in ((alice, "alice"), (bob, "bob")):
        raw.submit(sign_tx(raw.identity, node, "register_node", registration(raw.identity, "")))
        raw.submit(sign_tx(raw.identity, node, "session_join", {"contract": "default", "node": node, "min_peers": 2}))
    head = alice.head()
    checkin = {"contract": "default", "round": 1, "hash": "cd" * 32, "weight": 1, "size": 10}
    a_fp, b_fp = alice.identity.fingerprint, bob.identity.fingerprint

    def signed_by_alice(signer: Signer, kind: str, payload: dict) -> SignedTx:
        tx = Tx(kind, payload, signer, time=1.0)
        return SignedTx(tx, alice.identity.sign(tx.signing_bytes()))

    # Claims to be bob, with alice's own certificate fingerprint: bob registered another certificate.
    refused(alice.submit(signed_by_alice(Signer("bob", a_fp), "checkin", {**checkin, "node": "bob"})),
            grpc.StatusCode.FAILED_PRECONDITION, "bob signed with a certificate other than the one it registered")
    # Claims bob's certificate fingerprint too: the SN sees alice's certificate on the connection.
    refused(alice.submit(signed_by_alice(Signer("bob", b_fp), "checkin", {**checkin, "node": "bob"})),
            grpc.StatusCode.PERMISSION_DENIED, "certificate other than the caller's")
    # Signs honestly as alice but acts for bob.
    refused(alice.submit(signed_by_alice(Signer("alice", a_fp), "checkin", {**checkin, "node": "bob"})),
            grpc.StatusCode.FAILED_PRECONDITION, "alice cannot act for node bob")
    refused(alice.submit(signed_by_alice(Signer("alice", a_fp), "session_leave",
                                         {"contract": "default", "node": "bob"})),
            grpc.StatusCode.FAILED_PRECONDITION, "alice cannot act for node bob")
    # Takes over bob's node id by registering it with alice's certificate.
    refused(alice.submit(signed_by_alice(Signer("bob", a_fp), "register_node",
                                         {**registration(alice.identity, "127.0.0.1:1"), "node_id": "bob"})),
            grpc.StatusCode.FAILED_PRECONDITION, "a node's id is the name in its certificate (alice)")
    # Sends bob's genuine signed transaction (captured on the way) over her own connection.
    bobs = sign_tx(bob.identity, "bob", "checkin", {**checkin, "node": "bob"})
    refused(alice.submit(bobs), grpc.StatusCode.PERMISSION_DENIED, "certificate other than the caller's")
    # Puts her name on bob's signature.
    tx = Tx("checkin", {**checkin, "node": "alice"}, Signer("alice", a_fp), time=1.0)
    refused(alice.submit(SignedTx(tx, bobs.signature)), grpc.StatusCode.FAILED_PRECONDITION,
            "signature of checkin by alice does not verify")
    assert alice.head() == head
    # Bob's own submission of the same transaction is his to make.
    assert not isinstance(bob.submit(bobs), grpc.RpcError)
    alice.close()
    bob.close()
