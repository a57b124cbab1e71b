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
