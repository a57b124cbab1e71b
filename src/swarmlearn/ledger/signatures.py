"""Who may sign what: certificates and trusted CAs as the ledger records them, and signature checks.

The ledger carries every certificate that ever signed an entry (in the genesis and registration
entries) and every CA trusted (genesis, trust_ca), so a verifier needs nothing but the log.
"""

from __future__ import annotations

import time

from cryptography import x509

from swarmlearn import pki
from swarmlearn.errors import Rejected
from swarmlearn.ledger.entry import Signer, SignedTx, Tx


def _cert_in_payload(tx: Tx) -> str | None:
    if tx.kind == "genesis":
        return (tx.payload.get("sn") or {}).get("cert")
    if tx.kind == "register_node":
        return tx.payload.get("cert")
    return None


class SignatureChecker:
    def __init__(self) -> None:
        self.certs: dict[str, x509.Certificate] = {}
        self.cas: dict[str, x509.Certificate] = {}

    def check(self, tx: Tx, signature: bytes) -> None:
        """Raises Rejected unless `signature` is the signer's over `tx` and the signer's certificate
        was issued by a CA the ledger trusts."""
        if tx.kind == "trust_ca":
            self._check_trust_ca(tx)
        pem = _cert_in_payload(tx)
        if pem is not None:
            cert = self._parse(pem, tx)
            cas = self._genesis_cas(tx) if tx.kind == "genesis" else self.cas
            if not any(pki.issued_by(cert, ca) for ca in cas.values()):
                raise Rejected(f"certificate of {tx.signer.node} ({pki.common_name(cert)}) is not issued by a CA "
                               f"this swarm trusts")
        else:
            cert = self.certs.get(tx.signer.cert_fp)
            if cert is None:
                raise Rejected(f"certificate {tx.signer.cert_fp[:12]} of {tx.signer.node} is unknown; register first")
        if not pki.verify_signature(cert, tx.signing_bytes(), signature):
            raise Rejected(f"signature of {tx.kind} by {tx.signer.node} does not verify")

    def learn(self, tx: Tx) -> None:
        """Records the certificates and CAs of an accepted transaction."""
        pem = _cert_in_payload(tx)
        if pem is not None:
            cert = pki.cert_from_pem(pem)
            self.certs[pki.cert_fingerprint(cert)] = cert
        if tx.kind == "genesis":
            self.cas.update(self._genesis_cas(tx))
        elif tx.kind == "trust_ca":
            ca = pki.cert_from_pem(tx.payload["ca_cert"])
            self.cas[pki.cert_fingerprint(ca)] = ca

    @staticmethod
    def _check_trust_ca(tx: Tx) -> None:
        try:
            ca = pki.cert_from_pem(tx.payload.get("ca_cert", ""))
        except ValueError:
            raise Rejected("trust_ca carries no PEM CA certificate") from None
        if pki.cert_fingerprint(ca) != tx.payload.get("ca_fp"):
            raise Rejected("trust_ca: ca_fp is not the fingerprint of ca_cert")

    @staticmethod
    def _parse(pem: str, tx: Tx) -> x509.Certificate:
        try:
            cert = pki.cert_from_pem(pem)
        except (ValueError, TypeError, AttributeError):
            raise Rejected(f"{tx.kind} of {tx.signer.node} carries no valid PEM certificate") from None
        if pki.cert_fingerprint(cert) != tx.signer.cert_fp:
            raise Rejected(f"{tx.kind} of {tx.signer.node}: the certificate carried is not the one that signed")
        return cert

    @staticmethod
    def _genesis_cas(tx: Tx) -> dict[str, x509.Certificate]:
        cas = {}
        for pem in tx.payload.get("ca_certs") or []:
            try:
                ca = pki.cert_from_pem(pem)
            except (ValueError, TypeError, AttributeError):
                raise Rejected("genesis lists a CA that is not a PEM certificate") from None
            cas[pki.cert_fingerprint(ca)] = ca
        if sorted(cas) != sorted(tx.payload.get("ca_fingerprints") or []):
            raise Rejected("genesis ca_fingerprints do not match its ca_certs")
        return cas


def sign_tx(identity: pki.Identity, node_id: str, kind: str, payload: dict, now: float | None = None) -> SignedTx:
    """Makes a transaction as `node_id` and signs it with the identity's certificate key."""
    tx = Tx(kind=kind, payload=payload, signer=Signer(node_id, identity.fingerprint),
            time=time.time() if now is None else now)
    return SignedTx(tx, identity.sign(tx.signing_bytes()))


def registration(identity: pki.Identity, node_id: str, role: str, address: str, **info) -> dict:
    """The payload by which a node enters the ledger, carrying the certificate that proves it."""
    return {"node_id": node_id, "role": role, "address": address, "cert_fp": identity.fingerprint,
            "subject": identity.common_name, "cert": identity.cert_pem.decode(), **info}
