"""Identities: gen-cert (a CA and a key+certificate per component of a host and per training node) and
loading them for mTLS.

Keys are ECDSA P-256: small, fast to sign ledger transactions with, and accepted by gRPC's TLS. Every
certificate is good for both TLS server and client use, because every node is both.

Every certificate carries who it is as a URI SAN in SPIFFE form, `spiffe://<organization>/<role>/<name>`:
the organization is the issuing CA's (its O attribute), the role one of ROLES, the name the node id it
has in the swarm. Servers read role and name from the verified certificate, never from a message.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from swarmlearn.errors import CertificateError, ConfigError
from swarmlearn.roles import MAPPABLE_ROLES, ROLES

# The per-host certificates gen-cert writes (named <role>-<index>); training nodes get one each (--nodes).
COMPONENTS = ("sn", "swop", "swci", "ui", "admin")
# Organization and node names: what fits a SPIFFE trust domain / path segment and a file name.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}", re.IGNORECASE)
ORG_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
CA_VALIDITY = dt.timedelta(days=3650)
CERT_VALIDITY = dt.timedelta(days=825)


# --------------------------------------------------------------------------------------------------
# gen-cert


@dataclass(frozen=True)
class CertLayout:
    """Where gen-cert puts things for host index I under a cert folder (the original's layout)."""

    root: Path
    index: int

    @property
    def capath(self) -> Path:
        return self.root / "ca" / "capath"

    @property
    def ca_cert(self) -> Path:
        return self.capath / f"ca-{self.index}-cert.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / f"ca-{self.index}-key.pem"

    def cert(self, component: str) -> Path:
        return self.root / f"{component}-{self.index}-cert.pem"

    def key(self, component: str) -> Path:
        return self.root / f"{component}-{self.index}-key.pem"

    def node_cert(self, name: str) -> Path:
        """A training node's own certificate (role sl, name = its node id)."""
        return self.root / f"sl-{name}-cert.pem"

    def node_key(self, name: str) -> Path:
        return self.root / f"sl-{name}-key.pem"


def org_name(text: str) -> str:
    """An organization name made from free text (an example's name, "My Demo"): lower-cased, every
    character a SPIFFE trust domain may not hold turned into '-', "swarm" if nothing is left."""
    return re.sub(r"[^a-z0-9._-]", "-", text.lower()).strip("-._")[:63] or "swarm"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(index: int, org: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{org} CA {index}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _issue(ca_key, ca_cert: x509.Certificate, role: str, name: str, sans: list[str],
           validity: dt.timedelta = CERT_VALIDITY) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    org = ca_organization(ca_cert)
    general_names = [x509.UniformResourceIdentifier(spiffe_id(org, role, name)), *_san_entries(sans)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                                     content_commitment=False, data_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .sign(ca_key, _signing_hash(ca_key))
    )
    return key, cert


def _signing_hash(key) -> hashes.HashAlgorithm | None:
    """The hash to sign with `key`: none for Ed25519 and Ed448, whose signatures hash by themselves."""
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The issuer's key id as the CA states it (RFC 5280 4.2.1.1): a CA made by another tool may
    compute its Subject Key Identifier otherwise than from a SHA-1 of its key, and verifiers that
    compare the two would then not find the issuer."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def generate_host_certs(
    out: Path,
    index: int,
    *,
    org: str = "swarm",
    nodes: list[str] | None = None,
    sans: list[str] | None = None,
    components: tuple[str, ...] = COMPONENTS,
    ca_cert_path: Path | None = None,
    ca_key_path: Path | None = None,
    trust: list[Path] | None = None,
    force: bool = False,
) -> list[Path]:
    """Writes a CA (or reuses one) and a key+certificate per component and per training node under `out`.

    The CA used is, in order: the one given by `ca_cert_path`/`ca_key_path` (another host's CA, so
    this host's identities are trusted wherever that CA is), the one already in `out` for this index,
    or a new one for organization `org`. A reused CA keeps its own organization. Each component's
    certificate is named <component>-<index> (role = component); each of `nodes` gets an `sl`
    certificate named after it (default: one node named node<index>; [] for none). `trust` copies further CA
    certificates into capath: trust is the union of capath. Refuses to overwrite an existing key
    unless `force`. Writes all or nothing.
    """
    if index < 0:
        raise ConfigError(f"host index must be 0 or more, got {index}")
    if not ORG_PATTERN.fullmatch(org):
        raise ConfigError(f"organization {org!r} must be 1-63 lower-case letters, digits, '.', '-' or '_' "
                          f"(it is the trust domain of spiffe://<organization>/...); pass another --org")
    nodes = list(dict.fromkeys(nodes)) if nodes is not None else [f"node{index}"]
    for name in nodes:
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"node name {name!r} must be 1-63 letters, digits, '.', '-' or '_'; fix --nodes")
    layout = CertLayout(Path(out), index)
    issued = [(c, f"{c}-{index}", layout.key(c), layout.cert(c)) for c in components]
    issued += [("sl", name, layout.node_key(name), layout.node_cert(name)) for name in nodes]
    existing = [p for *_, key, cert in issued for p in (key, cert) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists; pass --force to replace the keys of host {index}, "
                          f"or choose another --workspace/--out")
    if (ca_cert_path is None) != (ca_key_path is None):
        raise ConfigError("give both --ca-cert and --ca-key to issue from an existing CA, or neither")

    files: dict[Path, tuple[bytes, int]] = {}
    if ca_cert_path is not None:
        ca_key, ca_cert = _load_ca(Path(ca_cert_path), Path(ca_key_path))
        files[layout.capath / Path(ca_cert_path).name] = (cert_to_pem(ca_cert), 0o644)
    elif layout.ca_key.exists() and layout.ca_cert.exists():
        ca_key, ca_cert = _load_ca(layout.ca_cert, layout.ca_key)
    else:
        ca_key, ca_cert = _make_ca(index, org)
        files[layout.ca_key] = (_key_pem(ca_key), 0o600)
        files[layout.ca_cert] = (cert_to_pem(ca_cert), 0o644)
    if not is_ca(ca_cert):
        raise CertificateError(f"{ca_cert_path}: {pki_subject(ca_cert)} {NOT_A_CA}; pass a CA certificate as --ca-cert")
    if not ORG_PATTERN.fullmatch(ca_organization(ca_cert)):
        raise CertificateError(f"the CA {pki_subject(ca_cert)} names no usable organization (O attribute); "
                               f"issue from a CA made by `swarm gen-cert --org <name>`")
    for extra in trust or []:
        files[layout.capath / Path(extra).name] = (_read_ca_cert_bytes(Path(extra)), 0o644)

    for role, name, key_path, cert_path in issued:
        key, cert = _issue(ca_key, ca_cert, role, name, [role, "localhost", "127.0.0.1", "::1", *(sans or [])])
        files[key_path] = (_key_pem(key), 0o600)
        files[cert_path] = (cert_to_pem(cert), 0o644)

    _write_all(files)
    _rehash(layout.capath)
    return sorted(files)


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def openssl_subject_hash(cert: x509.Certificate) -> str:
    """The name under which `openssl verify -CApath` looks a CA up (X509_NAME_hash): SHA-1 over
    OpenSSL's canonical form of the subject (values as lower-cased UTF8String, spaces collapsed)."""
    encoded = b""
    for rdn in cert.subject.rdns:
        parts = b""
        for attr in rdn:
            value = " ".join(str(attr.value).split()).lower().encode()
            oid = x509.ObjectIdentifier(attr.oid.dotted_string)
            parts += _der(0x30, _der_oid(oid) + _der(0x0C, value))
        encoded += _der(0x31, parts)
    digest = hashlib.sha1(encoded).digest()
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


def _der_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, body)


def _rehash(capath: Path) -> None:
    """Adds the <hash>.N links OpenSSL tools expect in a CApath folder (like `openssl rehash`)."""
    for link in capath.glob("*.[0-9]"):
        if link.is_symlink():
            link.unlink()
    taken: dict[str, int] = {}
    for pem in sorted(capath.glob("*.pem")):
        for cert in x509.load_pem_x509_certificates(pem.read_bytes()):
            h = openssl_subject_hash(cert)
            n = taken.get(h, 0)
            taken[h] = n + 1
            (capath / f"{h}.{n}").symlink_to(pem.name)
            break


def _write_all(files: dict[Path, tuple[bytes, int]]) -> None:
    """Writes every file to a temporary name first, then renames them all: no half-written set."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, (data, mode) in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            staged.append((Path(tmp), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _load_ca(cert_path: Path, key_path: Path):
    cert = load_cert(cert_path)
    key = _load_key(key_path)
    if not _same_public_key(key, cert):
        raise CertificateError(f"{key_path} is not the key of {cert_path}; give the matching CA key")
    return key, cert


def _same_public_key(key, cert: x509.Certificate) -> bool:
    def spki(public) -> bytes:
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    return spki(key.public_key()) == spki(cert.public_key())


def _read_ca_cert_bytes(path: Path) -> bytes:
    return cert_to_pem(load_cert(path))


# --------------------------------------------------------------------------------------------------
# loading identities


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} not found; check {flag} (make one with `swarm gen-cert`)") from None
    except IsADirectoryError:
        raise CertificateError(f"{path}: is a folder, expected a {what} file; check {flag}") from None
    except PermissionError:
        raise CertificateError(f"{path}: {what} is not readable by this user; fix its permissions") from None


def load_cert(path: Path, flag: str = "--cert") -> x509.Certificate:
    data = _read(path, "certificate", flag)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{path}: not a PEM certificate; check {flag}") from None


def _load_key(path: Path, flag: str = "--key"):
    data = _read(path, "private key", flag)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"{path}: not an unencrypted PEM private key; check {flag}") from None


def load_ca_certs(capath: Path) -> list[tuple[Path, x509.Certificate]]:
    """The CAs this node trusts: every CA certificate in the capath folder (or the one PEM file)."""
    found = _capath_certificates(capath)
    cas = [(p, c) for p, c in found if is_ca(c)]
    if not cas:
        others = "".join(f" ({p.name}: {pki_subject(c)} {NOT_A_CA})" for p, c in found[:1])
        raise CertificateError(f"{capath}: holds no CA certificate{others}; check --capath")
    return cas


def _capath_certificates(capath: Path) -> list[tuple[Path, x509.Certificate]]:
    """Every certificate in the capath folder (or the one PEM file), CA or not."""
    capath = Path(capath)
    if capath.is_dir():
        paths = sorted(p for p in capath.iterdir()
                       if p.is_file() and not p.is_symlink() and not p.name.startswith("."))
    elif capath.is_file():
        paths = [capath]
    else:
        raise CertificateError(f"{capath}: CA folder not found; check --capath (gen-cert writes cert/ca/capath)")
    found: list[tuple[Path, x509.Certificate]] = []
    for p in paths:
        try:
            certs = x509.load_pem_x509_certificates(_read(p, "CA certificate", "--capath"))
        except ValueError:
            continue  # not a certificate file; capath folders often hold other files
        found.extend((p, c) for c in certs)
    return found


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def cert_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@functools.lru_cache(maxsize=4096)
def cached_cert(pem: str | bytes) -> x509.Certificate:
    """A PEM certificate, parsed once per distinct PEM (the ledger and the SN's callers present the
    same few certificates over and over); raises ValueError if it is not one."""
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def peer_certificate(context) -> tuple[x509.Certificate, str] | None:
    """The certificate a gRPC caller presented at the (verified) TLS handshake and its fingerprint."""
    found = peer_identity(context)
    return None if found is None else found[:2]


def peer_identity(context) -> tuple[x509.Certificate, str, SwarmId | None] | None:
    """The certificate a gRPC caller presented, its fingerprint and the swarm identity it carries."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    return _presented(bytes(pems[0]))


@functools.lru_cache(maxsize=4096)
def _presented(pem: bytes) -> tuple[x509.Certificate, str, SwarmId | None]:
    # Every RPC presents one of a few certificates: its fingerprint (a DER encoding and a hash, about
    # 0.1 ms) and its identity are read once per certificate, not once per call.
    cert = cached_cert(pem)
    return cert, cert_fingerprint(cert), swarm_id(cert)


def pki_subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def ca_organization(ca: x509.Certificate) -> str:
    """The organization a CA issues for: its subject's O attribute."""
    attrs = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if attrs else ""


def spiffe_id(org: str, role: str, name: str) -> str:
    return f"spiffe://{org}/{role}/{name}"


@dataclass(frozen=True)
class SwarmId:
    """Who a certificate says it is: organization, role and name, from its SPIFFE URI SAN."""

    org: str
    role: str
    name: str

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.org, self.role, self.name)

    def __str__(self) -> str:
        return self.spiffe_id


_SPIFFE = re.compile(r"spiffe://([^/]+)/([^/]+)/([^/]+)")


def swarm_id(cert: x509.Certificate) -> SwarmId | None:
    """The certificate's swarm identity, or None when it carries no `spiffe://<org>/<role>/<name>` URI
    of ours (an older certificate, or one made by the original product's gen-cert)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = [m for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)
             if (m := _SPIFFE.fullmatch(uri))]
    if len(found) != 1:
        return None
    org, role, name = found[0].groups()
    if role not in ROLES or not ORG_PATTERN.fullmatch(org) or not NAME_PATTERN.fullmatch(name):
        return None
    return SwarmId(org, role, name)


REISSUE = "re-issue it with `swarm gen-cert --force` (certificates now carry spiffe://<organization>/<role>/<name>)"
REISSUE_HINT = f"{REISSUE}, or have an admin map its fingerprint with `swarm admin map-cert`"


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` signed `cert` (issuer name and signature only: no dates, no policy). What the ledger
    asks; a node's own certificate gets the full check of `verify_leaf` at start-up."""
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _both_tls_roles(policy, cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None) -> None:
    if usage is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage):
        raise ValueError("its extended key usage must allow both TLS server and client authentication")


def _signs_certificates(policy, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("its key usage does not allow signing certificates (keyCertSign)")


# The Web PKI rules for a leaf certificate (not a CA, a Subject Alternative Name, key usages fit for
# TLS), with two changes: every swarm node both serves and connects, so an extended key usage, when
# present, must allow both; and an Authority Key Identifier may be missing, as in certificates made by
# other tools (it only helps find the issuer; the issuer's signature is what is checked).
_LEAF_POLICY = (ExtensionPolicy.webpki_defaults_ee()
                .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
                .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _both_tls_roles))
# The Web PKI rules for a CA, relaxed to what OpenSSL's TLS (and so gRPC) accepts, because organizations
# bring their own CAs: a Key Usage may be missing (`openssl req -x509` writes none) and, if present,
# must allow signing certificates; Basic Constraints need not be critical. The verifier itself still
# requires them to say CA:TRUE.
_CA_POLICY = (ExtensionPolicy.webpki_defaults_ca()
              .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
              .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _signs_certificates))
# No rules on extensions (beyond a CA's CA:TRUE): to find out, when a chain is refused, which of the
# CA and the leaf breaks them.
_ANY_CA = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
_ANY_LEAF = ExtensionPolicy.permit_all()
# Keys TLS accepts from a CA but the Web PKI verifier does not (see _stand_ins).
_EDWARDS_KEYS = (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
_EXTENSION_NAMES = {ExtensionOID.BASIC_CONSTRAINTS: "Basic Constraints", ExtensionOID.KEY_USAGE: "Key Usage",
                    ExtensionOID.EXTENDED_KEY_USAGE: "Extended Key Usage", ExtensionOID.NAME_CONSTRAINTS:
                    "Name Constraints", ExtensionOID.SUBJECT_ALTERNATIVE_NAME: "Subject Alternative Name",
                    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: "Authority Key Identifier"}
NOT_A_CA = "is not a CA: its Basic Constraints do not say CA:TRUE"
FIX_CA = ("fix or re-issue that CA (it needs Basic Constraints with CA:TRUE and, if it has a Key Usage, "
          "keyCertSign), or issue the certificates from another CA")


def verify_leaf(cert: x509.Certificate, cas: list[x509.Certificate], now: dt.datetime | None = None,
                where: str = "the trusted CAs") -> None:
    """Checks with cryptography's verifier that one of `cas` (those of `where`, for messages) issued
    `cert`, that both are valid at `now`, that the CA follows _CA_POLICY and `cert` is a leaf fit for TLS
    client and server use (_LEAF_POLICY). `cas` may hold certificates that are no CA: they are trusted
    for nothing, only named if they issued `cert`. Raises CertificateError naming the certificate at
    fault (`cert` or its CA), its subject, the reason and what to do.

    For a node's own certificate at start-up. The ledger checks only `issued_by`, on purpose: it
    replays history, so its verdicts may not depend on today's date or on a library's rules."""
    now = now or _now()
    issuer = max((ca for ca in cas if issued_by(cert, ca)), key=is_ca, default=None)  # a CA, if one signed it
    if issuer is not None and not is_ca(issuer) and issuer != cert:
        raise CertificateError(f"certificate {pki_subject(cert)} was issued by {pki_subject(issuer)}, which "
                               f"{NOT_A_CA}; {FIX_CA}")
    cas = [ca for ca in cas if is_ca(ca)]
    if not cas:
        raise CertificateError(f"certificate {pki_subject(cert)} cannot be checked: no CA is trusted")
    if issuer is not None and isinstance(issuer.public_key(), _EDWARDS_KEYS):
        cert, issuer = _stand_ins(cert, issuer)
        cas = [issuer]
    try:
        _verify(cert, cas, now, _CA_POLICY, _LEAF_POLICY)
    except VerificationError as exc:
        raise CertificateError(f"certificate {pki_subject(cert)} {_refusal(cert, cas, now, where, exc)}") from None


def _verify(cert: x509.Certificate, cas: list[x509.Certificate], now: dt.datetime, ca_policy: ExtensionPolicy,
            leaf_policy: ExtensionPolicy) -> None:
    (PolicyBuilder().store(Store(cas)).time(now).extension_policies(ca_policy=ca_policy, ee_policy=leaf_policy)
     .build_client_verifier().verify(cert, []))


def _stand_ins(cert: x509.Certificate, ca: x509.Certificate) -> tuple[x509.Certificate, x509.Certificate]:
    """Copies of `cert` and of its CA `ca`, every field and extension kept, both signed by a throwaway
    P-256 key that also replaces the CA's. For a CA whose key TLS accepts but the Web PKI verifier
    forbids (Ed25519, Ed448): `issued_by` has checked the real signature, the verifier checks all the
    rest on the copies."""
    signer = ec.generate_private_key(ec.SECP256R1())

    def copy(original: x509.Certificate, public_key) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(original.subject).issuer_name(original.issuer)
                   .public_key(public_key).serial_number(original.serial_number)
                   .not_valid_before(original.not_valid_before_utc).not_valid_after(original.not_valid_after_utc))
        for extension in original.extensions:
            builder = builder.add_extension(extension.value, extension.critical)
        return builder.sign(signer, hashes.SHA256())

    try:
        return copy(cert, cert.public_key()), copy(ca, signer.public_key())
    except ValueError as exc:  # e.g. a serial number of 0, which RFC 5280 forbids
        raise CertificateError(f"certificate {pki_subject(cert)} or its CA {pki_subject(ca)} is malformed "
                               f"({exc}); re-issue it") from None


def _refusal(cert: x509.Certificate, cas: list[x509.Certificate], now: dt.datetime, where: str,
             exc: VerificationError) -> str:
    """Why the verifier refused `cert`, in the user's terms, with what to do."""
    if is_ca(cert):
        return ("is a CA certificate, not a node's; pass the certificate gen-cert wrote for this component "
                "(<role>-<index>-cert.pem) or node (sl-<name>-cert.pem)")
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}; make a new one with `swarm gen-cert --force`"
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this host's clock"
    issuers = [ca for ca in cas if issued_by(cert, ca)]
    if not issuers:
        return (f"is not signed by any CA in {where}; pass the --capath of the CA that issued it, or add "
                f"that CA to the folder")
    ca = issuers[0]
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        return (f"was issued by the CA {pki_subject(ca)}, which is valid only from {ca.not_valid_before_utc:%Y-%m-%d} "
                f"to {ca.not_valid_after_utc:%Y-%m-%d}; make a new CA and certificates with `swarm gen-cert --force`")
    return _rule_breaker(cert, ca, now, _reason(exc))


def _rule_breaker(cert: x509.Certificate, ca: x509.Certificate, now: dt.datetime, reason: str) -> str:
    """Which of `cert` and its CA `ca` breaks the verifier's rules, and what it lacks: a key too weak,
    else the extensions, told apart by checking again with no rules on the leaf's, then on the CA's."""
    ca_is = f"was issued by the CA {pki_subject(ca)}, which"
    if weakness := _key_weakness(ca):
        return f"{ca_is} has {weakness}; make a new CA (`swarm gen-cert` makes one) and issue from it"
    if weakness := _key_weakness(cert):
        return f"has {weakness}; {_leaf_fix(cert)}"
    if _failure(cert, ca, now, _ANY_CA, _ANY_LEAF) is None:  # the extensions are what is wrong
        if ca_reason := _failure(cert, ca, now, _CA_POLICY, _ANY_LEAF):
            return f"{ca_is} does not meet the rules for a CA ({ca_reason}); {FIX_CA}"
        reason = _failure(cert, ca, now, _ANY_CA, _LEAF_POLICY) or reason
    return f"does not meet the rules for a TLS certificate ({reason}); {_leaf_fix(cert)}"


def _failure(cert: x509.Certificate, ca: x509.Certificate, now: dt.datetime, ca_policy: ExtensionPolicy,
             leaf_policy: ExtensionPolicy) -> str | None:
    try:
        _verify(cert, [ca], now, ca_policy, leaf_policy)
    except VerificationError as exc:
        return _reason(exc)
    return None


def _reason(exc: VerificationError) -> str:
    """The verifier's reason without its framing, extensions by name rather than number."""
    reason = str(exc).removeprefix("validation failed: ").split(" (encountered processing")[0]
    reason = reason.removeprefix("candidates exhausted: ")
    reason = re.sub(r"^Python extension validator failed: \w+: ", "", reason)
    reason = re.sub(r"AlgorithmIdentifier \{.*params: (\w+).*\}", r"\1", reason)
    oid = re.match(r"invalid extension: ([0-9.]+): ", reason)
    if oid:
        name = _EXTENSION_NAMES.get(x509.ObjectIdentifier(oid[1]), f"extension {oid[1]}")
        reason = f"its {name}: {reason[oid.end():].lower()}"
    return reason


def _key_weakness(cert: x509.Certificate) -> str | None:
    """What is wrong with the key of `cert` for TLS here, if anything: RSA under 2048 bits, an elliptic
    curve other than P-256, P-384 and P-521, or another kind (a CA may also have an Ed25519 or Ed448
    key; a node's key signs ledger entries, which only ECDSA and RSA do)."""
    public = cert.public_key()
    kinds = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, *(_EDWARDS_KEYS if is_ca(cert) else ()))
    if not isinstance(public, kinds):
        return f"a key of a kind not accepted here ({type(public).__name__.lstrip('_')}; use ECDSA P-256 or RSA)"
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
        return f"an RSA key of {public.key_size} bits, too weak (at least 2048 bits are needed)"
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name not in ("secp256r1", "secp384r1",
                                                                                   "secp521r1"):
        return f"a key on the curve {public.curve.name}, which is not accepted (use P-256, P-384 or P-521)"
    return None


def _leaf_fix(cert: x509.Certificate) -> str:
    """What to do about a leaf that breaks the rules: our gen-cert's are made again by it; another tool's
    are fixed where they were made."""
    if swarm_id(cert) is not None:
        return "re-issue it with `swarm gen-cert --force`"
    return "fix or re-issue it with the tool that made it, or make one with `swarm gen-cert`"


def verify_signature(cert: x509.Certificate, data: bytes, signature: bytes) -> bool:
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass
class Identity:
    """A node's key, certificate and trusted CAs, checked once at start-up."""

    key_path: Path
    cert_path: Path
    capath: Path
    key: object
    cert: x509.Certificate
    cas: list[x509.Certificate]

    @classmethod
    def load(cls, key: Path, cert: Path, capath: Path, now: dt.datetime | None = None) -> Identity:
        key_path, cert_path, capath = Path(key), Path(cert), Path(capath)
        certificate = load_cert(cert_path)
        private_key = _load_key(key_path)
        if not _same_public_key(private_key, certificate):
            raise CertificateError(f"{key_path} is not the private key of {cert_path}; pass the matching --key")
        cas = [c for _, c in load_ca_certs(capath)]
        try:
            # All of capath, so that a refusal can name an issuer that is there but is no CA.
            verify_leaf(certificate, [c for _, c in _capath_certificates(capath)], now, where=str(capath))
        except CertificateError as exc:
            raise CertificateError(f"{cert_path}: {exc}") from None
        return cls(key_path, cert_path, capath, private_key, certificate, cas)

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert)

    @property
    def swarm_id(self) -> SwarmId | None:
        return swarm_id(self.cert)

    def require_role(self, role: str) -> SwarmId | None:
        """Refuses to run a component with another role's certificate. A certificate without a role
        (made before roles existed) passes here; the ledger accepts it only if an admin mapped it."""
        ident = self.swarm_id
        if ident is not None and ident.role != role:
            raise CertificateError(f"{self.cert_path}: is the certificate of {ident} (role {ident.role}); "
                                   f"a {role} needs a certificate of role {role} (see `swarm gen-cert`)")
        return ident

    def node_name(self, role: str | None, given: str | None = None) -> str:
        """The node id a component runs as: the name in its certificate, which must be of `role` (None:
        whichever role it has). `given` (its --node-id) may only repeat that name, except for a role-less
        (older) certificate, which runs under `given` alone: the name an admin mapped it to with `swarm
        admin map-cert` (the ledger refuses it under any other). Raises CertificateError saying what to do."""
        ident = self.swarm_id if role is None else self.require_role(role)
        if ident is not None:
            if given and given != ident.name:
                raise CertificateError(f"--node-id {given} is not the name in {self.cert_path} ({ident}); a node's "
                                       f"id is its certificate's name: leave --node-id out or use the certificate "
                                       f"of {given}")
            return ident.name
        if given:
            return given
        if role is None or role in MAPPABLE_ROLES:
            raise CertificateError(f"{self.cert_path}: carries no swarm role and name; "
                                   f"{'pass --node-id with' if role else 'give as its node id'} the name an admin "
                                   f"mapped it to (`swarm admin map-cert`), or {REISSUE}")
        raise CertificateError(f"{self.cert_path}: carries no swarm role and name, and `swarm {role}` runs only "
                               f"under the name in its certificate; {REISSUE}")

    @property
    def name(self) -> str:
        """This node's name in the swarm: its certificate's, else (older certificates) the common name."""
        ident = self.swarm_id
        return ident.name if ident is not None else self.common_name

    @property
    def common_name(self) -> str:
        return common_name(self.cert)

    @property
    def cert_pem(self) -> bytes:
        return cert_to_pem(self.cert)

    @property
    def ca_bundle(self) -> bytes:
        return b"".join(cert_to_pem(c) for c in self.cas)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        raise CertificateError(f"{self.key_path}: only EC and RSA keys can sign ledger entries")

    def server_credentials(self):
        import grpc

        key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        return grpc.ssl_server_credentials([(key_pem, self.cert_pem)], root_certificates=self.ca_bundle,
                                           require_client_auth=True)

    def channel_credentials(self):
        import grpc

        key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        return grpc.ssl_channel_credentials(root_certificates=self.ca_bundle, private_key=key_pem,
                                            certificate_chain=self.cert_pem)

