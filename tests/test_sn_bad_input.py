"""`swarm sn` refuses bad set-ups with one line that names the file and the fix, and writes nothing."""

from __future__ import annotations

import datetime as dt
import socket

import pytest

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import identity, identity_args, run_swarm, start_sn
from swarmlearn.pki import _load_ca


def sn_command(certs, data_dir, *extra):
    return ("sn", "--sentinel", "--sn-api-port", "0", *identity_args(certs, "sn"), "--data-dir", str(data_dir),
            *extra)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_key_file(certs, tmp_path):
    result = run_swarm("sn", "--sentinel", "--sn-api-port", "0", "--key", str(tmp_path / "nokey.pem"),
                       "--cert", str(certs.cert("sn")), "--capath", str(certs.capath), "--data-dir",
                       str(tmp_path / "d"))
    assert_one_line_error(result, "nokey.pem", "not found", "--key")
    assert not (tmp_path / "d").exists()


def test_certificate_not_signed_by_any_ca_in_capath(certs, foreign_certs, tmp_path):
    result = run_swarm("sn", "--sentinel", "--sn-api-port", "0", "--key", str(foreign_certs.key("sn")),
                       "--cert", str(foreign_certs.cert("sn")), "--capath", str(certs.capath), "--data-dir",
                       str(tmp_path / "d"))
    assert_one_line_error(result, "sn-9-cert.pem", "not signed by any CA")
    assert not (tmp_path / "d").exists()


def test_expired_certificate(certs, tmp_path):
    ca_key, ca_cert = _load_ca(certs.ca_cert, certs.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sn-old")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "old-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    result = run_swarm("sn", "--sentinel", "--sn-api-port", "0", "--key", str(tmp_path / "old-key.pem"),
                       "--cert", str(tmp_path / "old-cert.pem"), "--capath", str(certs.capath), "--data-dir",
                       str(tmp_path / "d"))
    assert_one_line_error(result, "old-cert.pem", "expired", "gen-cert")


def test_port_in_use(certs, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_swarm("sn", "--sentinel", "--sn-api-port", str(port), *identity_args(certs, "sn"),
                           "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(result, f"127.0.0.1:{port}", "in use", "--sn-api-port")
    assert not (tmp_path / "d").exists()


def test_data_dir_of_another_swarm(procs, certs, foreign_certs, tmp_path):
    data = tmp_path / "d"
    start_sn(procs, foreign_certs, data).proc.kill()
    before = run_swarm("ledger", "show", str(data)).stdout
    result = run_swarm(*sn_command(certs, data))
    assert_one_line_error(result, "ledger.db", "another swarm", "--data-dir")
    assert run_swarm("ledger", "show", str(data)).stdout == before


def test_corrupted_ledger_file(certs, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "ledger.db").write_bytes(b"this is not SQLite at all" * 100)
    result = run_swarm(*sn_command(certs, data))
    assert_one_line_error(result, "ledger.db", "not a readable ledger database")


def test_member_sn_on_an_empty_data_dir_is_told_to_start_a_sentinel(certs, tmp_path):
    result = run_swarm("sn", "--sn-api-port", "0", *identity_args(certs, "sn"), "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(result, "not the sentinel", "--sentinel")


def test_ledger_verify_on_a_missing_file(tmp_path):
    result = run_swarm("ledger", "verify", str(tmp_path / "nothing.db"))
    assert_one_line_error(result, "nothing.db", "no ledger file")


def test_sn_patience_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch, certs):
    from swarmlearn.errors import ConfigError
    from swarmlearn.sn.client import SNClient

    monkeypatch.setenv("SWARM_SN_PATIENCE", "120")
    with SNClient("127.0.0.1:9", identity(certs, "swci")) as client:
        assert client.unreachable_timeout == 120
    monkeypatch.setenv("SWARM_SN_PATIENCE", "two minutes")
    with pytest.raises(ConfigError, match="SWARM_SN_PATIENCE='two minutes' is not a number of seconds"):
        SNClient("127.0.0.1:9", identity(certs, "swci"))
