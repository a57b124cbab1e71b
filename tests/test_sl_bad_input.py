"""`swarm sl` with a wrong SN address or certificates says so within seconds and exits non-zero."""

from __future__ import annotations

import shutil
import socket
import time

from conftest import identity_args, run_swarm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_sn_address_is_a_clear_error_within_seconds(certs, tmp_path):
    started = time.monotonic()
    result = run_swarm("sl", "--sn-ip", "127.0.0.1", "--sn-api-port", str(free_port()), "--sl-fs-port", "0",
                       *identity_args(certs, "sl"), "--node-id", "node1", "--data-dir", str(tmp_path / "sl"),
                       "--connect-timeout", "3")
    assert result.returncode == 1
    assert "no SN answered at 127.0.0.1:" in result.stderr and "--sn-ip" in result.stderr
    assert time.monotonic() - started < 20


def test_certificates_the_sn_does_not_trust_are_a_clear_error(sn, certs, foreign_certs, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(certs.ca_cert, both)
    shutil.copy(foreign_certs.ca_cert, both)
    host, port = sn.address.rsplit(":", 1)
    result = run_swarm("sl", "--sn-ip", host, "--sn-api-port", port, "--sl-fs-port", "0",
                       "--key", str(foreign_certs.node_key("node1")), "--cert", str(foreign_certs.node_cert("node1")),
                       "--capath", str(both), "--node-id", "node1", "--connect-timeout", "3")
    assert result.returncode == 1
    assert "certificates" in result.stderr and "CA" in result.stderr
