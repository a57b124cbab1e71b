"""Signatures: that each transaction was signed by the certificate it names.

The ledger carries every certificate that ever signed an entry (in the genesis and registration
entries), so a verifier needs nothing but the log. Whether that certificate may act at all (a trusted
CA issued it for its organization and role, it is not revoked) is the state machine's business
(ledger/identities.py); here only the signature itself is checked.
"""

from __future__ import annotations

import time

from cryptography import x509

from swarmlearn import pki
from swarmlearn.errors import Rejected
from swarmlearn.ledger.entry import Signer, SignedTx, Tx


def _cert_in_payload(tx: Tx) -> str | None:
    if tx.kind == "genesis":
        sn = tx.payload.get("sn")
        return sn.get("cert") if isinstance(sn, dict) else None
    if tx.kind == "register_node":
        return tx.payload.get("cert")
    return None


class SignatureChecker:
    def __init__(self) -> None:
        self.certs: dict[str, x509.Certificate] = {}

    def check(self, tx: Tx, signature: bytes) -> None:
        """Raises Rejected unless `signature` is the signer's over `tx`."""
        pem = _cert_in_payload(tx)
        if pem is not None:
            cert = self._parse(pem, tx)
        else:
            cert = self.certs.get(tx.signer.cert_fp)
            if cert is None:
                raise Rejected(f"certificate {tx.signer.cert_fp[:12]} of {tx.signer.node} is unknown; register first")
        if not pki.verify_signature(cert, tx.signing_bytes(), signature):
            raise Rejected(f"signature of {tx.kind} by {tx.signer.node} does not verify")

    def learn(self, tx: Tx) -> None:
        """Records the certificate an accepted transaction carried."""
        pem = _cert_in_payload(tx)
        if pem is not None:
            cert = pki.cached_cert(pem)
            self.certs[pki.cert_fingerprint(cert)] = cert

    @staticmethod
    def _parse(pem, tx: Tx) -> x509.Certificate:
        try:
            cert = pki.cached_cert(pem)
        except (ValueError, TypeError, AttributeError):
            raise Rejected(f"{tx.kind} of {tx.signer.node} carries no valid PEM certificate") from None
        if pki.cert_fingerprint(cert) != tx.signer.cert_fp:
            raise Rejected(f"{tx.kind} of {tx.signer.node}: the certificate carried is not the one that signed")
        return cert


def sign_tx(identity: pki.Identity, node_id: str, kind: str, payload: dict, now: float | None = None) -> SignedTx:
    """Makes a transaction as `node_id` and signs it with the identity's certificate key."""
    tx = Tx(kind=kind, payload=payload, signer=Signer(node_id, identity.fingerprint),
            time=time.time() if now is None else now)
    return SignedTx(tx, identity.sign(tx.signing_bytes()))


def registration(identity: pki.Identity, address: str, node_id: str | None = None, **info) -> dict:
    """The payload by which a node enters the ledger: its certificate, which says its role and name, and
    `node_id` (default: the identity's name), which must repeat that name, or for a role-less certificate
    the name an admin mapped it to."""
    return {"node_id": node_id or identity.name, "address": address, "cert": identity.cert_pem.decode(), **info}


def is_registered(node: dict | None, identity: pki.Identity, address: str, **info) -> bool:
    """Whether the ledger's record of a node (its entry in the "nodes" section of the state) already
    holds this certificate, address and info, so that registering again would add an entry and
    change nothing."""
    return (node is not None and node.get("cert_fp") == identity.fingerprint and node.get("address") == address
            and node.get("info", {}) == info)
