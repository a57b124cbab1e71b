"""The ledger is lost and restored from a backup (issue 13, item 6): `swarm ledger backup` and
`swarm ledger restore`, one backup format (an SQLite file laid out as ledger.db) whatever the store.

- a backup taken while the SN runs, restored after ledger.db is lost: the SN serves the same head and
  a follower that pinned that head accepts it;
- an older backup restored: the SN refuses it (its swarm.json) and so does a follower that verified
  newer entries (its pin), each with the line the README documents, until the operator removes the
  marker and the pin, deliberately;
- etcd: a prefix backed up, restored into a new empty prefix, both verify to the same head; a prefix
  that holds keys is refused;
- a backup that does not verify is refused before anything is written.

Real `swarm sn` processes and one real etcd member (mutual TLS, the swarm's ledger CA) on 127.0.0.1,
every `swarm ledger` command a real process; followers run in the test's process.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conftest import identity, run_swarm, start_sn
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry
from swarmlearn.ledger.etcd_member import EtcdCluster
from swarmlearn.ledger.etcd_store import EtcdStore
from swarmlearn.ledger.pin import PIN_FILE
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.server import LEDGER_FILE, MARKER_FILE, genesis_tx
from test_rollback import follower, grow, refusal, restart, sn_refuses
from test_sn_etcd import etcd_identity_args, ready, sn_args
from test_store_conformance import etcd_cluster, sn_tls  # noqa: F401 (a fixture)


def swarm_ok(*args: str) -> str:
    done = run_swarm(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def swarm_refused(*args: str) -> str:
    """Runs a `swarm` command expected to fail with one error line on stderr; returns that line."""
    done = run_swarm(*args)
    assert done.returncode != 0, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def reported_head(output: str) -> tuple[int, str]:
    """(index, hash) of what `ledger backup`/`ledger restore` print: '...; head <index> <hash>'."""
    index, digest = output.splitlines()[0].rsplit("; head ", 1)[1].split()
    return int(index), digest


def verified_head(*args: str) -> str:
    """The head hash `swarm ledger verify` reports (OK <n> entries <hash>)."""
    return swarm_ok("ledger", "verify", *args).split()[3]


def stop_and_wait(sn) -> None:
    """SIGTERM, as a user stops it (it records its head in swarm.json), then wait until it is gone."""
    sn.proc.kill(15)
    sn.proc.popen.wait(timeout=15)


def head_served(sn, certs) -> tuple[int, str]:
    with SNClient(sn.address, identity(certs, "swci")) as client:
        client.wait_ready(10)
        info = client.query("info")["info"]
    return info["head_index"], info["head_hash"]


def endpoints(cluster: EtcdCluster) -> str:
    return ",".join(cluster.client_urls)


def etcd_args(cluster: EtcdCluster, prefix: str) -> list[str]:
    return ["--etcd-endpoints", endpoints(cluster), "--etcd-prefix", prefix, *etcd_identity_args(cluster.tls)]


def edited_backup(certs, path: Path, column: str) -> Path:
    """A ledger file holding a sentinel's genesis (made without an SN), then one byte of `column` of
    that entry changed, as someone editing a backup would."""
    signed = genesis_tx(identity(certs, "sn"), "127.0.0.1:30304")
    store = SQLiteStore(path)
    store.append_if_head_is(None, Entry(0, GENESIS_PREV_HASH, signed.tx, signed.signature))
    store.close()
    db = sqlite3.connect(path)
    with db:
        value = db.execute(f"SELECT {column} FROM entries WHERE idx = 0").fetchone()[0]
        edited = (("1" if value[0] == "0" else "0") + value[1:] if isinstance(value, str)
                  else bytes([value[0] ^ 1]) + value[1:])
        db.execute(f"UPDATE entries SET {column} = ? WHERE idx = 0", (edited,))
    db.close()
    return path


# -------------------------------------------------------------------------------------------- SQLite


@pytest.mark.slow
def test_a_backup_taken_while_the_sn_runs_brings_back_the_ledger_it_lost(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    last = grow(sn, certs, 3)
    pin = tmp_path / "sl" / PIN_FILE
    node = follower(sn, certs, pin)
    node.wait_index(last, timeout=20)
    node.stop()

    backup = tmp_path / "backups" / "ledger-1.db"
    said = swarm_ok("ledger", "backup", str(sn.data_dir), str(backup))  # the SN still runs
    index, head_hash = reported_head(said)
    assert index == last and f"backed up {last + 1} entries" in said, said
    stop_and_wait(sn)
    assert head_hash == verified_head(str(sn.data_dir))

    # The disk is lost: ledger.db and its side files gone, swarm.json left. The SN refuses to go on.
    for side in ("", "-wal", "-shm"):
        Path(f"{sn.data_dir / LEDGER_FILE}{side}").unlink(missing_ok=True)
    assert "restore" in sn_refuses(certs, sn.data_dir)

    said = swarm_ok("ledger", "restore", str(backup), str(sn.data_dir))
    assert reported_head(said) == (last, head_hash) and f"restored {last + 1} entries" in said, said
    again = restart(procs, certs, sn)
    assert head_served(again, certs) == (last, head_hash)
    # A follower that verified every entry the swarm had accepts the restored ledger.
    node = follower(again, certs, pin)
    try:
        node.wait_index(last, timeout=20)
        assert node.error is None and node.state.head_hash == head_hash
    finally:
        node.stop()


@pytest.mark.slow
def test_an_older_backup_is_refused_by_the_sn_and_its_followers_until_the_operator_accepts_it(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    backed_up = grow(sn, certs, 1)
    backup = tmp_path / "ledger-old.db"
    swarm_ok("ledger", "backup", str(sn.data_dir), str(backup))
    last = grow(sn, certs, 3)
    pin = tmp_path / "sl" / PIN_FILE
    node = follower(sn, certs, pin)
    node.wait_index(last, timeout=20)
    node.stop()
    stop_and_wait(sn)

    # Over an existing ledger only with --force, which keeps the replaced one.
    line = swarm_refused("ledger", "restore", str(backup), str(sn.data_dir))
    assert f"{sn.data_dir / LEDGER_FILE} exists" in line and "--force" in line, line
    done = run_swarm("ledger", "restore", str(backup), str(sn.data_dir), "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    kept = Path(done.stdout.split("kept as ")[1].split()[0])
    shorter = f"ends at entry {backed_up}, short of entry {last} that this SN (per {sn.data_dir / MARKER_FILE})"
    assert "warning: the SN will refuse this ledger" in done.stderr and shorter in done.stderr, done.stderr
    assert swarm_ok("ledger", "verify", str(kept)).startswith(f"OK {last + 1} entries ")

    # The SN refuses it (its marker), with the README's line.
    line = sn_refuses(certs, sn.data_dir)
    assert f"{sn.data_dir / LEDGER_FILE} {shorter} verified: history was rolled back" in line, line

    # No newer backup: the operator removes the marker, the SN starts on the shorter history...
    (sn.data_dir / MARKER_FILE).unlink()
    again = restart(procs, certs, sn)
    assert head_served(again, certs)[0] == backed_up
    # ...and a follower that verified the lost entries refuses it (its pin), until its pin is deleted.
    node = follower(again, certs, pin)
    try:
        line = str(refusal(node))
    finally:
        node.stop()
    assert (f"the ledger SN {again.address} serves ends at entry {backed_up}, short of entry {last} that this "
            f"node verified: history was rolled back" in line and str(pin) in line), line
    pin.unlink()
    node = follower(again, certs, pin)
    try:
        node.wait_index(backed_up, timeout=20)
        assert node.error is None
    finally:
        node.stop()


def test_a_backup_that_does_not_verify_is_refused_before_anything_is_written(certs, tmp_path):
    backup = edited_backup(certs, tmp_path / "edited.db", "body")
    data_dir = tmp_path / "sn"
    line = swarm_refused("ledger", "restore", str(backup), str(data_dir))
    assert f"{backup}: entry 0: " in line and "edited" in line, line
    assert not (data_dir / LEDGER_FILE).exists() and list(data_dir.iterdir()) == []

    line = swarm_refused("ledger", "restore", str(tmp_path / "missing.db"), str(data_dir))
    assert f"{tmp_path / 'missing.db'}: no such file" in line, line
    line = swarm_refused("ledger", "backup", str(tmp_path / "no-sn"), str(tmp_path / "out.db"))
    assert f"{tmp_path / 'no-sn'}" in line and "--data-dir" in line, line


# -------------------------------------------------------------------------------------------- etcd


@pytest.mark.slow
def test_an_etcd_ledger_backed_up_restores_into_an_empty_prefix_with_the_same_head(procs, certs, tmp_path,
                                                                                  etcd_cluster):
    source, copy = "/backup-source", "/backup-copy"
    sn = ready(procs.swarm(*sn_args(endpoints(etcd_cluster), certs, tmp_path / "sn", prefix=source,
                                    etcd_identity=etcd_cluster.tls), "--sentinel"), tmp_path / "sn")
    last = grow(sn, certs, 2)
    backup = tmp_path / "etcd-backup.db"
    said = swarm_ok("ledger", "backup", str(backup), *etcd_args(etcd_cluster, source))
    index, head_hash = reported_head(said)
    assert index == last and f"from etcd ledger {source}" in said, said
    assert verified_head(str(backup)) == head_hash  # one format: an SQLite file like ledger.db

    said = swarm_ok("ledger", "restore", str(backup), *etcd_args(etcd_cluster, copy))
    assert reported_head(said) == (last, head_hash), said
    assert verified_head(*etcd_args(etcd_cluster, copy)) == verified_head(*etcd_args(etcd_cluster, source)) == head_hash

    for taken in (source, copy):
        line = swarm_refused("ledger", "restore", str(backup), *etcd_args(etcd_cluster, taken))
        assert f"etcd ledger {taken} holds keys already" in line and "--etcd-prefix" in line, line


def test_an_etcd_restore_of_a_backup_that_does_not_verify_writes_nothing(certs, tmp_path, etcd_cluster):
    backup = edited_backup(certs, tmp_path / "edited.db", "hash")
    line = swarm_refused("ledger", "restore", str(backup), *etcd_args(etcd_cluster, "/backup-edited"))
    assert f"{backup}: entry 0: its bytes do not match its stored hash" in line, line
    store = EtcdStore(etcd_cluster.endpoints, "/backup-edited", sn_tls(certs))
    try:
        assert not store.holds_keys()
    finally:
        store.close()
