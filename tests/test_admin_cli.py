"""What an admin does with `swarm admin`, against a real `swarm sn` over mutual TLS:

- an older certificate, one without a swarm role and name (made here by another tool), is mapped by an
  admin to a role and a name, and a node then runs with it under that name: it registers and heartbeats;
- changing one limit of a contract leaves the others as they were.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from conftest import identity, identity_args, run_swarm
from swarmlearn import pki
from swarmlearn.sn.client import SNClient
from swarmlearn.defaults import DEFAULT_CONTRACT
from test_policy import _issue


def roleless_certificate(certs, folder: Path, common_name: str) -> tuple[Path, Path]:
    """A key and a certificate from the swarm's own CA, as another tool would make them: no SPIFFE URI."""
    key, cert = _issue(pki._load_key(certs.ca_key), pki.load_cert(certs.ca_cert), "test", spiffe=None,
                       common_name=common_name)
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / f"{common_name}-key.pem", folder / f"{common_name}-cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(pki.cert_to_pem(cert))
    return key_path, cert_path


def admin(sn, certs, *args: str):
    host, port = sn.address.rsplit(":", 1)
    return run_swarm("admin", "--sn-ip", host, "--sn-api-port", port, *identity_args(certs, "admin"), *args)


def test_an_admin_maps_a_roleless_certificate_and_a_node_runs_under_that_name(procs, certs, sn, tmp_path):
    key, cert = roleless_certificate(certs, tmp_path / "old", "old-laptop")
    host, port = sn.address.rsplit(":", 1)
    sl = ["sl", "--sn-ip", host, "--sn-api-port", port, "--sl-fs-port", "0", "--key", str(key), "--cert", str(cert),
          "--capath", str(certs.capath), "--connect-timeout", "10"]

    # Without a name the node does not know who it is, and says what to do.
    done = run_swarm(*sl, "--data-dir", str(tmp_path / "sl-0"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "carries no swarm role and name; pass --node-id with the name an admin mapped it to" in done.stderr
    # Before an admin mapped it, the ledger refuses it under any name.
    done = run_swarm(*sl, "--node-id", "legacy-7", "--data-dir", str(tmp_path / "sl-1"))
    assert done.returncode == 1 and "carries no swarm role and name; re-issue it" in done.stderr, done.stderr

    done = admin(sn, certs, "map-cert", str(cert), "--role", "sl", "--name", "legacy-7")
    assert done.returncode == 0 and "acts as sl legacy-7" in done.stdout, done.stdout + done.stderr

    node = procs.swarm(*sl, "--node-id", "legacy-7", "--data-dir", str(tmp_path / "sl-2"))
    node.wait_for_line("SL legacy-7 ready: SWARM_SL_ADDR=")
    with SNClient(sn.address, identity(certs, "swci")) as swci:
        swci.wait_ready(10)
        registered = swci.query("nodes")["nodes"]["legacy-7"]
        assert registered["role"] == "SL" and registered["spiffe_id"] == "spiffe://test/sl/legacy-7", registered
        assert registered["cert_fp"] == pki.cert_fingerprint(pki.load_cert(cert))
        # It heartbeats under its mapped name: the SN heard from it within the last couple of seconds.
        time.sleep(2.5)
        assert swci.query("info")["last_seen"]["legacy-7"] < 2.0
    assert node.popen.poll() is None, node.output


def test_changing_one_contract_limit_sends_only_that_limit(certs, sn):
    done = admin(sn, certs, "contract-limits", "--max-blob-bytes", "123456789")
    assert done.returncode == 0, done.stdout + done.stderr
    done = admin(sn, certs, "contract-limits", "--max-min-peers", "8")
    assert done.returncode == 0 and "{'max_min_peers': 8}" in done.stdout, done.stdout + done.stderr
    done = admin(sn, certs, "contract-limits")
    assert done.returncode == 2 and "give at least one of --max-min-peers" in done.stderr, done.stderr

    with SNClient(sn.address, identity(certs, "swci")) as swci:
        swci.wait_ready(10)
        updates = []
        for entry in swci.watch(0):
            if entry.tx.kind == "contract_update":
                updates.append(entry.tx.payload)
            if len(updates) == 2:
                break
        # What the ledger is sent is the limits given, nothing else ...
        assert [u["limits"] for u in updates] == [{"max_blob_bytes": 123456789}, {"max_min_peers": 8}], updates
        # ... and what it holds keeps the limit set before.
        limits = swci.query("contracts")["contracts"][DEFAULT_CONTRACT]["limits"]
    assert limits["max_min_peers"] == 8 and limits["max_blob_bytes"] == 123456789, limits
