"""The SN answers only certificates its ledger trusts. A CA file in an SN's --capath lets that CA's
certificates through the TLS handshake, but trusting an organization is an admin's decision recorded
on the ledger (`swarm admin trust-ca`), and so is giving a certificate without a swarm role and name
one (`swarm admin map-cert`): until then the SN answers them nothing, not even a read.
A real `swarm sn` process over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import signal

import grpc
import pytest

from conftest import identity, start_sn
from swarmlearn.pki import CertLayout, Identity, generate_host_certs
from swarmlearn.proto import sn_pb2, sn_pb2_grpc
from test_admin_cli import roleless_certificate


READS = [("Query", sn_pb2.QueryRequest(section="all")), ("Watch", sn_pb2.WatchRequest(from_index=0)),
         ("Heartbeat", sn_pb2.HeartbeatRequest(node_id="swci-2"))]


def call(address: str, ident, method: str, request):
    """One call over the generated stub; the first message of a stream."""
    channel = grpc.secure_channel(address, ident.channel_credentials())
    try:
        reply = getattr(sn_pb2_grpc.SwarmNetworkStub(channel), method)(request, timeout=10)
        return next(reply) if method == "Watch" else reply
    finally:
        channel.close()


def refused(address: str, ident, *fragments: str) -> None:
    for method, request in READS:
        with pytest.raises(grpc.RpcError) as refusal:
            call(address, ident, method, request)
        assert refusal.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, refusal.value.details())
        for fragment in fragments:
            assert fragment in refusal.value.details(), (method, refusal.value.details())


def test_certificates_the_ledger_does_not_trust_cannot_even_read(procs, tmp_path):
    # The swarm is founded while the SN's capath holds only our CA, so the genesis trusts only it.
    root = tmp_path / "cert"
    generate_host_certs(root, 1, org="ours")
    ours = CertLayout(root, 1)
    sn = start_sn(procs, ours, tmp_path / "sn")
    sn.proc.kill(signal.SIGTERM)

    # Another organization's CA lands in the same capath folder, and the SN is started again on its ledger.
    generate_host_certs(root, 2, org="other")
    other = CertLayout(root, 2)
    sn = start_sn(procs, ours, sn.data_dir)
    assert "is not trusted by this swarm" in sn.proc.output

    refused(sn.address, identity(other, "swci"), "is not issued by a CA this swarm trusts", "swarm admin trust-ca")

    # A certificate of our own CA without a swarm role and name, that no admin mapped, is refused too.
    key, cert = roleless_certificate(ours, tmp_path / "old", "old-laptop")
    refused(sn.address, Identity.load(key, cert, ours.capath), "carries no swarm role and name", "map-cert")

    # Our own certificates are answered as before.
    reply = call(sn.address, identity(ours, "swci"), "Query", sn_pb2.QueryRequest(section="info"))
    assert reply.head_index >= 0
