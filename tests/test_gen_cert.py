"""`swarm gen-cert` as a user runs it: files where the original puts them, trusted by openssl and by
each other over TLS, never overwritten by accident."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading

import pytest

from conftest import run_swarm
from swarmlearn import pki
from swarmlearn.errors import CertificateError, ConfigError
from swarmlearn.pki import CertLayout, Identity, generate_host_certs


def test_gen_cert_writes_the_original_layout_with_private_keys(tmp_path):
    result = run_swarm("gen-cert", "-e", "hf", "-i", "1", "--workspace", str(tmp_path), "--nodes", "node1,node2")
    assert result.returncode == 0, result.stderr
    cert = tmp_path / "hf" / "cert"
    assert (cert / "ca" / "capath" / "ca-1-cert.pem").is_file()
    assert stat.S_IMODE((cert / "ca" / "ca-1-key.pem").stat().st_mode) == 0o600
    for name in ("sn-1", "swop-1", "swci-1", "ui-1", "admin-1", "sl-node1", "sl-node2"):
        assert (cert / f"{name}-cert.pem").is_file()
        assert stat.S_IMODE((cert / f"{name}-key.pem").stat().st_mode) == 0o600


def test_every_certificate_says_organization_role_and_name(tmp_path):
    layout = CertLayout(tmp_path, 2)
    generate_host_certs(tmp_path, 2, org="hospital-a", nodes=["ward1"])
    ids = {str(pki.swarm_id(pki.load_cert(path))) for path in
           [layout.cert(c) for c in pki.COMPONENTS] + [layout.node_cert("ward1")]}
    assert ids == {"spiffe://hospital-a/sn/sn-2", "spiffe://hospital-a/swop/swop-2", "spiffe://hospital-a/swci/swci-2",
                   "spiffe://hospital-a/ui/ui-2", "spiffe://hospital-a/admin/admin-2", "spiffe://hospital-a/sl/ward1"}
    with pytest.raises(CertificateError, match="a sl needs a certificate of role sl"):
        Identity.load(layout.key("sn"), layout.cert("sn"), layout.capath).require_role("sl")
    with pytest.raises(ConfigError, match="organization"):
        generate_host_certs(tmp_path / "bad", 1, org="Bad Org!")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
def test_openssl_verifies_every_certificate_against_capath(tmp_path):
    layout = CertLayout(tmp_path, 3)
    generate_host_certs(tmp_path, 3, sans=["sn1.example", "10.1.2.3"])
    for comp in pki.COMPONENTS:
        out = subprocess.run(["openssl", "verify", "-CApath", str(layout.capath), str(layout.cert(comp))],
                             capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(layout.cert("sn"))],
                          capture_output=True, text=True).stdout
    for san in ("DNS:sn", "DNS:localhost", "IP Address:127.0.0.1", "DNS:sn1.example", "IP Address:10.1.2.3"):
        assert san in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text


def test_refuses_to_overwrite_keys_without_force(tmp_path):
    assert run_swarm("gen-cert", "--out", str(tmp_path), "-i", "1").returncode == 0
    key = (tmp_path / "sn-1-key.pem").read_bytes()
    again = run_swarm("gen-cert", "--out", str(tmp_path), "-i", "1")
    assert again.returncode == 1
    assert "sn-1-key.pem already exists" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "sn-1-key.pem").read_bytes() == key
    assert run_swarm("gen-cert", "--out", str(tmp_path), "-i", "1", "--force").returncode == 0
    assert (tmp_path / "sn-1-key.pem").read_bytes() != key


def test_reusing_the_ca_a_second_host_is_trusted_by_the_first(tmp_path):
    host1, host2 = CertLayout(tmp_path / "h1", 1), CertLayout(tmp_path / "h2", 2)
    generate_host_certs(host1.root, 1)
    generate_host_certs(host2.root, 2, ca_cert_path=host1.ca_cert, ca_key_path=host1.ca_key)
    assert not host2.ca_key.exists()  # the first host's CA key was used, not copied
    Identity.load(host2.node_key("node2"), host2.node_cert("node2"), host1.capath)
    Identity.load(host1.node_key("node1"), host1.node_cert("node1"), host2.capath)


def test_trust_is_the_union_of_the_cas_in_capath(tmp_path):
    a, b = CertLayout(tmp_path / "a", 1), CertLayout(tmp_path / "b", 2)
    generate_host_certs(a.root, 1)
    generate_host_certs(b.root, 2, trust=[a.ca_cert])
    with pytest.raises(CertificateError, match="not signed by any CA"):
        Identity.load(b.key("sn"), b.cert("sn"), a.capath)
    Identity.load(a.key("sn"), a.cert("sn"), b.capath)  # b's capath trusts a's CA too
    Identity.load(b.key("sn"), b.cert("sn"), b.capath)


def _tls_server(ctx: ssl.SSLContext, sock: socket.socket, errors: list) -> None:
    conn, _ = sock.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(5))
    except (ssl.SSLError, OSError) as exc:
        errors.append(exc)


def _context(layout: CertLayout, comp: str, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if comp == "sl":
        ctx.load_cert_chain(layout.node_cert("node1"), layout.node_key("node1"))
    else:
        ctx.load_cert_chain(layout.cert(comp), layout.key(comp))
    ctx.load_verify_locations(capath=str(layout.capath))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _mutual_tls_handshake(layout: CertLayout) -> None:
    """Node node1 connects to the SN of `layout` over TLS (OpenSSL), each checking the other against capath."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        errors: list = []
        server = threading.Thread(target=_tls_server, args=(_context(layout, "sn", True), sock, errors))
        server.start()
        client_ctx = _context(layout, "sl", False)
        with socket.create_connection(sock.getsockname()) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"hello")
                assert tls.recv(5) == b"hello"
                assert tls.getpeercert()["subject"][-1][0] == ("commonName", f"sn-{layout.index}")
        server.join(5)
        assert not errors


def test_two_identities_complete_a_mutual_tls_handshake(certs):
    _mutual_tls_handshake(certs)


def test_identity_load_names_the_bad_file(tmp_path, certs, foreign_certs):
    with pytest.raises(CertificateError, match="missing-key.pem: private key not found"):
        Identity.load(tmp_path / "missing-key.pem", certs.node_cert("node1"), certs.capath)
    with pytest.raises(CertificateError, match="is not the private key of"):
        Identity.load(certs.key("sn"), certs.node_cert("node1"), certs.capath)
    with pytest.raises(CertificateError, match="not signed by any CA in"):
        Identity.load(foreign_certs.node_key("node1"), foreign_certs.node_cert("node1"), certs.capath)
    with pytest.raises(CertificateError, match="CA folder not found"):
        Identity.load(certs.node_key("node1"), certs.node_cert("node1"), tmp_path / "nope")
    import datetime as dt

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3000)
    with pytest.raises(CertificateError, match="expired on"):
        Identity.load(certs.node_key("node1"), certs.node_cert("node1"), certs.capath, now=later)


# --------------------------------------------------------------------------------------------------
# cryptography's verifier: what gen-cert makes passes it, and what a node must not run with is refused


def test_every_certificate_passes_the_verifier_as_tls_client_and_as_server(tmp_path):
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store

    layout = CertLayout(tmp_path, 4)
    generate_host_certs(tmp_path, 4, org="clinic", nodes=["ward1"], sans=["sn4.example"])
    ca = pki.load_cert(layout.ca_cert)
    ca_key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    verifier = PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.timezone.utc))
    for path in [layout.cert(c) for c in pki.COMPONENTS] + [layout.node_cert("ward1")]:
        cert = pki.load_cert(path)
        client = verifier.build_client_verifier().verify(cert, [])
        assert str(pki.swarm_id(cert)) in [getattr(name, "value", None) for name in client.subjects], path
        for name in (DNSName("localhost"), DNSName("sn4.example"), IPAddress(ipaddress.ip_address("127.0.0.1"))):
            verifier.build_server_verifier(name).verify(cert, [])
        # RFC 5280: the leaf names its own key and its issuer's, as the CA states it.
        assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_key_id
        assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == \
            x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
        pki.verify_leaf(cert, [ca])  # and our own, stricter policy (both TLS roles)


def test_a_certificate_of_another_ca_is_refused_naming_its_subject(certs, foreign_certs):
    foreign = pki.load_cert(foreign_certs.node_cert("node1"))
    with pytest.raises(CertificateError) as refused:
        pki.verify_leaf(foreign, [pki.load_cert(certs.ca_cert)], where="the test capath")
    assert str(refused.value).startswith("certificate CN=node1,OU=sl,O=foreign is not signed by any CA in the "
                                         "test capath; pass the --capath of the CA that issued it"), refused.value


def test_an_expired_certificate_is_refused_naming_its_subject_and_the_date(certs):
    import datetime as dt

    cert = pki.load_cert(certs.node_cert("node1"))
    later = cert.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(CertificateError) as refused:
        Identity.load(certs.node_key("node1"), certs.node_cert("node1"), certs.capath, now=later)
    assert str(refused.value) == (
        f"{certs.node_cert('node1')}: certificate CN=node1,OU=sl,O=test expired on "
        f"{cert.not_valid_after_utc:%Y-%m-%d}; make a new one with `swarm gen-cert --force`")


def test_a_ca_certificate_is_refused_as_a_nodes_certificate(certs):
    with pytest.raises(CertificateError, match=r"ca-1-cert.pem: certificate CN=test CA 1,O=test is a CA certificate, "
                                               r"not a node's; pass the certificate gen-cert wrote"):
        Identity.load(certs.ca_key, certs.ca_cert, certs.capath)


def _leaf_of(ca_key, ca_cert, uri: str | None = None, **extensions):
    """A leaf certificate as another tool might make it, valid now, with the given extensions (and
    `uri` among its Subject Alternative Names)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]
                                                          + ([x509.UniformResourceIdentifier(uri)] if uri else [])),
                              critical=False))
    for extension in extensions.values():
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def test_a_certificate_for_one_tls_role_only_is_refused_with_what_to_do(certs):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key, ca = pki._load_ca(certs.ca_cert, certs.ca_key)
    server_only = _leaf_of(ca_key, ca, eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]))
    with pytest.raises(CertificateError) as refused:
        pki.verify_leaf(server_only, [ca])
    assert str(refused.value) == (
        "certificate CN=odd does not meet the rules for a TLS certificate (its extended key usage must allow both "
        "TLS server and client authentication); fix or re-issue it with the tool that made it, or make one with "
        "`swarm gen-cert`")
    pki.verify_leaf(_leaf_of(ca_key, ca), [ca])  # another tool's plain certificate (no AKI, no EKU) is fine

    # Only a certificate of ours, with a swarm role and name, is one `swarm gen-cert --force` makes again.
    ours = _leaf_of(ca_key, ca, "spiffe://test/sl/node7", eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]))
    with pytest.raises(CertificateError, match=r"CN=odd does not meet the rules for a TLS certificate \(its extended "
                                               r"key usage .*\); re-issue it with `swarm gen-cert --force`$"):
        pki.verify_leaf(ours, [ca])


def test_a_certificate_whose_ca_has_expired_is_refused_naming_the_ca(tmp_path):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "old"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = dt.datetime.now(dt.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    with pytest.raises(CertificateError, match=r"certificate CN=odd was issued by the CA CN=old CA,O=old, which is "
                                               r"valid only from .* to .*; make a new CA"):
        pki.verify_leaf(_leaf_of(ca_key, ca), [ca])


# --------------------------------------------------------------------------------------------------
# an organization's own CA: whatever TLS accepts as a CA issues certificates a node runs with


def _org_ca(folder, key, *, ca: bool = True, critical: bool = False, key_usage=None):
    """A CA of organization "acme" as its own tools make it; by default like `openssl req -x509` with
    OpenSSL's v3_ca section: Basic Constraints CA:TRUE (here not critical), Subject and Authority Key
    Identifiers, no Key Usage. Written to folder as acme-ca.pem and acme-ca-key.pem."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "acme root")])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=critical)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False))
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    cert = builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "acme-ca.pem").write_bytes(pki.cert_to_pem(cert))
    (folder / "acme-ca-key.pem").write_bytes(pki._key_pem(key))
    return folder / "acme-ca.pem", folder / "acme-ca-key.pem", cert


def _issue_from(ca_cert, ca_key, out) -> CertLayout:
    """`swarm gen-cert --ca-cert --ca-key`: host 1's certificates, and node1's, issued by that CA."""
    generate_host_certs(out, 1, nodes=["node1"], ca_cert_path=ca_cert, ca_key_path=ca_key)
    return CertLayout(out, 1)


def test_a_ca_made_like_openssl_req_x509_issues_certificates_that_load_and_complete_a_mutual_tls_handshake(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert, ca_key, ca = _org_ca(tmp_path / "acme", ec.generate_private_key(ec.SECP256R1()))
    layout = _issue_from(ca_cert, ca_key, tmp_path / "cert")
    leaf = pki.load_cert(layout.node_cert("node1"))
    assert pki.swarm_id(leaf) == pki.SwarmId("acme", "sl", "node1")
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    pki.verify_leaf(leaf, [ca])
    for key, cert in [(layout.key("sn"), layout.cert("sn")), (layout.node_key("node1"), layout.node_cert("node1"))]:
        Identity.load(key, cert, layout.capath)
    _mutual_tls_handshake(layout)


def test_an_ed25519_ca_issues_certificates_a_real_sn_serves_over_grpc(procs, tmp_path):
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from conftest import identity, start_sn
    from swarmlearn.proto import sn_pb2, sn_pb2_grpc

    key_usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False)
    ca_cert, ca_key, _ = _org_ca(tmp_path / "acme", ed25519.Ed25519PrivateKey.generate(), critical=True,
                                 key_usage=key_usage)
    layout = _issue_from(ca_cert, ca_key, tmp_path / "cert")
    _mutual_tls_handshake(layout)

    sn = start_sn(procs, layout, tmp_path / "sn")
    channel = grpc.secure_channel(sn.address, identity(layout, "sl").channel_credentials())
    try:
        reply = sn_pb2_grpc.SwarmNetworkStub(channel).Query(sn_pb2.QueryRequest(section="info"), timeout=10)
    finally:
        channel.close()
    assert reply.head_index >= 0


def test_a_certificate_issued_by_a_certificate_that_is_no_ca_is_refused_naming_it(tmp_path, certs):
    from cryptography.hazmat.primitives.asymmetric import ec

    not_ca_cert, not_ca_key, not_ca = _org_ca(tmp_path / "acme", ec.generate_private_key(ec.SECP256R1()), ca=False)
    with pytest.raises(CertificateError, match=r"acme-ca.pem: CN=acme root,O=acme is not a CA: its Basic "
                                               r"Constraints do not say CA:TRUE; pass a CA certificate as --ca-cert"):
        _issue_from(not_ca_cert, not_ca_key, tmp_path / "cert")

    # Made by another tool anyway, and its "CA" put in a capath beside a real CA.
    key, leaf = pki._issue(pki._load_key(not_ca_key), not_ca, "sl", "node1", ["localhost"])
    capath = tmp_path / "capath"
    capath.mkdir()
    shutil.copy(not_ca_cert, capath)
    shutil.copy(certs.ca_cert, capath)
    (tmp_path / "node1-key.pem").write_bytes(pki._key_pem(key))
    (tmp_path / "node1-cert.pem").write_bytes(pki.cert_to_pem(leaf))
    with pytest.raises(CertificateError) as refused:
        Identity.load(tmp_path / "node1-key.pem", tmp_path / "node1-cert.pem", capath)
    assert str(refused.value) == (
        f"{tmp_path / 'node1-cert.pem'}: certificate CN=node1,OU=sl,O=acme was issued by CN=acme root,O=acme, which "
        f"is not a CA: its Basic Constraints do not say CA:TRUE; {pki.FIX_CA}")
    (capath / certs.ca_cert.name).unlink()
    with pytest.raises(CertificateError, match=r"capath: holds no CA certificate \(acme-ca.pem: CN=acme root,O=acme "
                                               r"is not a CA: .*\); check --capath"):
        Identity.load(tmp_path / "node1-key.pem", tmp_path / "node1-cert.pem", capath)


def _rsa_1024():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(65537, 1024)


def _signs_only_data():
    from cryptography import x509

    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


@pytest.mark.parametrize("make_key, key_usage, lacks", [
    (_rsa_1024, None, r"has an RSA key of 1024 bits, too weak \(at least 2048 bits are needed\); make a new CA"),
    (None, _signs_only_data, r"does not meet the rules for a CA \(its key usage does not allow signing "
                             r"certificates \(keyCertSign\)\); fix or re-issue that CA"),
], ids=["rsa-1024", "no-keyCertSign"])
def test_a_ca_that_tls_refuses_is_named_with_what_it_lacks_and_the_leaf_is_not_blamed(tmp_path, make_key, key_usage,
                                                                                         lacks):
    from cryptography.hazmat.primitives.asymmetric import ec

    key = make_key() if make_key else ec.generate_private_key(ec.SECP256R1())
    ca_cert, ca_key, ca = _org_ca(tmp_path / "acme", key, key_usage=key_usage() if key_usage else None)
    layout = _issue_from(ca_cert, ca_key, tmp_path / "cert")
    with pytest.raises(CertificateError) as refused:
        Identity.load(layout.key("sn"), layout.cert("sn"), layout.capath)
    message = str(refused.value)
    assert re.search(f"certificate CN=sn-1,OU=sn,O=acme was issued by the CA CN=acme root,O=acme, which {lacks}",
                     message), message
    assert "gen-cert --force" not in message and "spiffe" not in message, message
