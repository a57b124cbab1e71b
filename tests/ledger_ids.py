"""Real identities for tests that drive the ledger state machine directly: certificates from our own
gen-cert (organization "test", and a second organization "other" with a CA of its own), made once per
test process. The state machine reads roles and names from these certificates, so fake fingerprints
will not do."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from swarmlearn import pki
from swarmlearn.ledger.entry import SignedTx, Tx
from swarmlearn.ledger.model import PROTOCOL_VERSION
from swarmlearn.ledger.signatures import registration, sign_tx

CONTRACT = "defaultbb.cqdb.sml.hpe"
RUNNER = "defaulttaskbb.taskdb.sml.hpe"
TRAINING_NODES = ["node1", "node2", "node3", "node4"]


@functools.cache
def identities() -> dict[str, pki.Identity]:
    """By node id: sn-1, swop-1, swci-1, ui-1, admin-1, node1..node4 of "test"; other-sl, swci-2, admin-2, swop-2 of "other"."""
    root = Path(tempfile.mkdtemp(prefix="swarm-ledger-ids-"))
    ours, theirs = pki.CertLayout(root / "test", 1), pki.CertLayout(root / "other", 2)
    pki.generate_host_certs(ours.root, 1, org="test", nodes=TRAINING_NODES)
    pki.generate_host_certs(theirs.root, 2, org="other", nodes=["other-sl"])
    found = {f"{c}-1": pki.Identity.load(ours.key(c), ours.cert(c), ours.capath) for c in pki.COMPONENTS}
    found.update({n: pki.Identity.load(ours.node_key(n), ours.node_cert(n), ours.capath) for n in TRAINING_NODES})
    found["other-sl"] = pki.Identity.load(theirs.node_key("other-sl"), theirs.node_cert("other-sl"), theirs.capath)
    found["swci-2"] = pki.Identity.load(theirs.key("swci"), theirs.cert("swci"), theirs.capath)
    found["admin-2"] = pki.Identity.load(theirs.key("admin"), theirs.cert("admin"), theirs.capath)
    found["swop-2"] = pki.Identity.load(theirs.key("swop"), theirs.cert("swop"), theirs.capath)
    return found


def ident(name: str) -> pki.Identity:
    return identities()[name]


def fingerprints() -> dict[str, str]:
    return {name: i.fingerprint for name, i in identities().items()}


def reg(name: str, address: str = "127.0.0.1:1") -> dict:
    return registration(ident(name), address)


def ca_pem(name: str) -> str:
    return pki.cert_to_pem(ident(name).cas[0]).decode()


def genesis_payload() -> dict:
    """What `swarm sn --sentinel` founds: our CA for every role, the default contract and runner."""
    return {"swarm_id": "s1", "protocol": PROTOCOL_VERSION, "cas": [{"cert": ca_pem("sn-1"), "org": "test", "roles": list(pki.ROLES)}],
            "default_contract": CONTRACT, "default_taskrunner": RUNNER, "sn": reg("sn-1")}


def signed(name: str, kind: str, payload: dict) -> SignedTx:
    return sign_tx(ident(name), name, kind, payload, now=0.0)


def tx(name: str, kind: str, payload: dict, cert_fp: str | None = None) -> Tx:
    """An unsigned transaction as `name` (the state machine does not read signatures)."""
    from swarmlearn.ledger.entry import Signer

    return Tx(kind, payload, Signer(name, cert_fp or ident(name).fingerprint))
