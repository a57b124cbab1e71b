"""Who is who on the ledger: the trusted CAs (each bound to one organization and the roles it may
issue), the nodes (role and name read from their certificates, never from a payload), certificates
mapped by an admin, and revocations.

Pure: certificates are parsed and their issuers' signatures checked, but nothing is read from disk
or clock (expiry is the TLS handshake's business).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from cryptography import x509

from swarmlearn import pki
from swarmlearn.errors import Rejected
from swarmlearn.ledger import payloads as P
from swarmlearn.ledger.entry import Tx
from swarmlearn.ledger.model import (OLDEST_PROTOCOL, PROTOCOL_VERSION, Contract, ContractLimits, Node, Role,
                                     TaskRunner, TrustedCA)

if TYPE_CHECKING:
    from swarmlearn.ledger.state import LedgerState


def _cert(pem: str) -> x509.Certificate:
    return pki.cached_cert(pem)


def parse_cert(pem: str, what: str) -> x509.Certificate:
    try:
        return _cert(pem)
    except (ValueError, TypeError):
        raise Rejected(f"{what} is not a PEM certificate") from None


def _parse_ca(grant: P.CAGrant, what: str) -> tuple[str, x509.Certificate]:
    ca = parse_cert(grant.cert, what)
    if not pki.is_ca(ca):
        raise Rejected(f"{what} is not a CA certificate")
    if pki.ca_organization(ca) != grant.org:
        raise Rejected(f"{what} issues for organization {pki.ca_organization(ca)!r}, not {grant.org!r}")
    return pki.cert_fingerprint(ca), ca


def identify(state: LedgerState, pem: str, tx: Tx) -> pki.SwarmId:
    """The identity a carried certificate proves, checked against the swarm's CAs and revocations.
    Raises Rejected unless the signer signed with exactly this certificate, a trusted CA issued it for
    that CA's own organization and a role the CA was granted, and it is not revoked."""
    cert = parse_cert(pem, f"{tx.kind} of {tx.signer.node}: the certificate")
    fp = pki.cert_fingerprint(cert)
    if fp != tx.signer.cert_fp:
        raise Rejected(f"{tx.kind} of {tx.signer.node}: the certificate carried is not the one that signed")
    if fp in state.revoked:
        raise Rejected(f"certificate {fp[:12]} was revoked at entry {state.revoked[fp]}; use a new certificate")
    ident = pki.swarm_id(cert) or state.cert_map.get(fp)
    if ident is None:
        raise Rejected(f"certificate {fp[:12]} ({pki.pki_subject(cert)}) carries no swarm role and name; "
                       f"{pki.REISSUE_HINT}")
    ca = issuer(state, cert)
    if ca is None:
        raise Rejected(f"certificate of {ident} is not issued by a CA this swarm trusts")
    if ident.org != ca.org:
        raise Rejected(f"certificate of {ident} names organization {ident.org}, but its CA issues for {ca.org} only")
    if ident.role not in ca.roles:
        raise Rejected(f"the CA of {ca.org} may not issue {ident.role} certificates (granted: "
                       f"{', '.join(ca.roles)}); {ident} is refused")
    return ident


def issuer(state: LedgerState, cert: x509.Certificate) -> TrustedCA | None:
    """The trusted CA that issued `cert`, if any."""
    return next((c for c in state.cas.values() if pki.issued_by(cert, _cert(c.cert))), None)


def verified_identity(state: LedgerState, pem: str) -> pki.SwarmId:
    """The identity of a certificate that `identify` already accepted for this very transaction (the
    state machine checks every transaction before it applies it): read, not verified again."""
    cert = _cert(pem)
    return pki.swarm_id(cert) or state.cert_map[pki.cert_fingerprint(cert)]


def registrant(state: LedgerState, tx: Tx, reg: P.Registration) -> pki.SwarmId:
    """The identity a registration proves; its node id and signer must be its certificate's name."""
    ident = identify(state, reg.cert, tx)
    if reg.node_id != ident.name or tx.signer.node != ident.name:
        raise Rejected(f"{ident} registers as {reg.node_id!r} signing as {tx.signer.node!r}: a node's id is "
                       f"the name in its certificate ({ident.name})")
    known = state.nodes.get(ident.name)
    # A node moves to a new certificate only from the CA that issued its first one: another CA, even
    # one of the same organization (another host's), cannot take a name over.
    if known is not None and ((known.org, known.role) != (ident.org, ident.role.upper())
                              or known.issuer != issuer(state, _cert(reg.cert)).fingerprint):
        raise Rejected(f"node id {ident.name} belongs to {known.spiffe_id} (certificates of CA {known.issuer[:12]}); "
                       f"this certificate cannot take it")
    return ident


def _put_node(state: LedgerState, reg: P.Registration, tx: Tx, index: int) -> None:
    ident = verified_identity(state, reg.cert)
    ca = issuer(state, _cert(reg.cert))
    state.nodes[ident.name] = Node(ident.name, ident.role.upper(), reg.address, tx.signer.cert_fp, ident.spiffe_id,
                                   index, dict(reg.model_extra or {}), ident.org, ca.fingerprint)


# ------------------------------------------------------------------------------ genesis

def validate_genesis(state: LedgerState, tx: Tx, p: P.Genesis) -> None:
    if state.genesis is not None or state.head_index != -1:
        raise Rejected("genesis may only be the first entry")
    if not OLDEST_PROTOCOL <= p.protocol <= PROTOCOL_VERSION:
        raise Rejected(f"this ledger was founded by swarmlearn protocol {p.protocol}, this node speaks protocol "
                       f"{PROTOCOL_VERSION} (and folds ledgers of protocol {OLDEST_PROTOCOL} to {PROTOCOL_VERSION}): "
                       f"run one swarmlearn version on every node of a swarm")
    cas = [_parse_ca(grant, f"genesis CA {i}") for i, grant in enumerate(p.cas)]
    if len({fp for fp, _ in cas}) != len(cas):
        raise Rejected("genesis lists a CA twice")
    if len({grant.org for grant in p.cas}) != len(p.cas):
        raise Rejected("genesis lists two CAs of one organization; each organization has one CA (make the other "
                       "hosts' certificates with `swarm gen-cert --ca-cert/--ca-key`, or give them another --org)")
    # The sentinel's own registration is checked against the CAs this very entry founds.
    from swarmlearn.ledger.state import LedgerState

    founding = LedgerState()
    _trust(founding, p.cas, 0)
    ident = registrant(founding, tx, p.sn)
    if ident.role != "sn":
        raise Rejected(f"genesis is signed by {ident}; only an SN (the sentinel) founds a swarm")


def _trust(state: LedgerState, grants: list[P.CAGrant], index: int) -> None:
    for grant in grants:
        fp = pki.cert_fingerprint(_cert(grant.cert))
        state.cas[fp] = TrustedCA(fp, grant.org, list(grant.roles), grant.cert, index)


def apply_genesis(state: LedgerState, tx: Tx, p: P.Genesis, index: int) -> None:
    _trust(state, p.cas, index)
    ident = verified_identity(state, p.sn.cert)
    state.genesis = p.model_dump(exclude={"cas", "sn"})
    state.genesis["org"] = ident.org
    _put_node(state, p.sn, tx, index)
    state.contracts[p.default_contract] = Contract(p.default_contract, created_by=ident.name,
                                                   limits=replace(ContractLimits(), **p.default_limits.given()))
    state.taskrunners[p.default_taskrunner] = TaskRunner(p.default_taskrunner, created_by=ident.name)


# ------------------------------------------------------------------------------ nodes

def validate_register_node(state: LedgerState, tx: Tx, p: P.Registration) -> None:
    """Nothing left to check: the payload's shape refused declared identity fields, and the
    certificate was checked when the signer's role was read from it (signer_role)."""


def apply_register_node(state: LedgerState, tx: Tx, p: P.Registration, index: int) -> None:
    _put_node(state, p, tx, index)


# ------------------------------------------------------------------------------ CAs and certificates

def validate_trust_ca(state: LedgerState, tx: Tx, p: P.TrustCA) -> None:
    fp, _ = _parse_ca(p, "trust_ca: the CA")
    if fp in state.cas:
        raise Rejected(f"CA {fp[:12]} of {p.org} is already trusted")
    owner = next((c for c in state.cas.values() if c.org == p.org), None)
    if owner is not None:
        raise Rejected(f"organization {p.org} already has a trusted CA ({owner.fingerprint[:12]}); a CA of another "
                       f"organization cannot issue in its name")
    if "admin" in p.roles:
        raise Rejected("trust_ca cannot grant the admin role: admins come only from the CAs the swarm was founded with")


def apply_trust_ca(state: LedgerState, tx: Tx, p: P.TrustCA, index: int) -> None:
    fp = pki.cert_fingerprint(_cert(p.cert))
    state.cas[fp] = TrustedCA(fp, p.org, list(p.roles), p.cert, index)


def validate_map_cert(state: LedgerState, tx: Tx, p: P.MapCert) -> None:
    cert = parse_cert(p.cert, "map_cert: the certificate")
    if pki.swarm_id(cert) is not None:
        raise Rejected(f"map_cert: the certificate already names {pki.swarm_id(cert)}; only role-less certificates "
                       f"are mapped")
    ca = issuer(state, cert)
    if ca is None:
        raise Rejected("map_cert: the certificate is not issued by a CA this swarm trusts")
    if p.role not in ca.roles:
        raise Rejected(f"map_cert: the CA of {ca.org} may not issue {p.role} certificates")


def apply_map_cert(state: LedgerState, tx: Tx, p: P.MapCert, index: int) -> None:
    cert = _cert(p.cert)
    state.cert_map[pki.cert_fingerprint(cert)] = pki.SwarmId(issuer(state, cert).org, p.role, p.name)


def validate_revoke_cert(state: LedgerState, tx: Tx, p: P.RevokeCert) -> None:
    if p.cert_fp in state.revoked:
        raise Rejected(f"certificate {p.cert_fp[:12]} is already revoked")
    if p.cert_fp == tx.signer.cert_fp:
        raise Rejected("an admin cannot revoke the certificate it signs with")


def apply_revoke_cert(state: LedgerState, tx: Tx, p: P.RevokeCert, index: int) -> None:
    state.revoked[p.cert_fp] = index


# ------------------------------------------------------------------------------ who signs

def signer_role(state: LedgerState, tx: Tx, payload: P.Payload) -> str:
    """The role of a transaction's signer: for a registration (and genesis), the one its carried
    certificate proves; otherwise that of the node it registered as, with the certificate it registered."""
    if isinstance(payload, P.Genesis):
        return Role.SN
    if isinstance(payload, P.Registration):
        return registrant(state, tx, payload).role.upper()
    node = state.nodes.get(tx.signer.node)
    if node is None:
        raise Rejected(f"signer {tx.signer.node} is not a registered node; register it first")
    if node.cert_fp != tx.signer.cert_fp:
        raise Rejected(f"signer {tx.signer.node} signed with a certificate other than the one it registered")
    if node.cert_fp in state.revoked:
        raise Rejected(f"the certificate of {node.spiffe_id} was revoked at entry {state.revoked[node.cert_fp]}")
    return node.role


def is_admin(state: LedgerState, node: str) -> bool:
    return node in state.nodes and state.nodes[node].role == Role.ADMIN
