"""`swarm gen-cert` as a user runs it: files where the original puts them, trusted by openssl and by
each other over TLS, never overwritten by accident."""

from __future__ import annotations

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


def test_two_identities_complete_a_mutual_tls_handshake(tmp_path, certs):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        errors: list = []
        server = threading.Thread(target=_tls_server, args=(_context(certs, "sn", True), sock, errors))
        server.start()
        client_ctx = _context(certs, "sl", False)
        with socket.create_connection(sock.getsockname()) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"hello")
                assert tls.recv(5) == b"hello"
                assert tls.getpeercert()["subject"][-1][0] == ("commonName", "sn-1")
        server.join(5)
        assert not errors


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


def _leaf_of(ca_key, ca_cert, **extensions):
    """A leaf certificate as another tool might make it, valid now, with the given extensions."""
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
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False))
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
        f"TLS server and client authentication); {pki.REISSUE}")
    pki.verify_leaf(_leaf_of(ca_key, ca), [ca])  # another tool's plain certificate (no AKI, no EKU) is fine


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
