"""The SN when its disk fills up or its data dir is read-only: it refuses new entries with a clear
error (the client gets a gRPC refusal naming the ledger file and the cause, the SN's log says the
same), keeps serving what it has, never corrupts the ledger (`swarm ledger verify` passes), and
carries on once space is back or when restarted on a writable copy.

What is real here:
- always: the SN process runs under RLIMIT_FSIZE (set between fork and exec, as `ulimit -f` does),
  so the kernel fails its writes past the limit with EFBIG, exactly where SQLite writes; "space
  returns" is the soft limit raised on the running process (prlimit);
- where the test may mount (root with CAP_SYS_ADMIN): a real, tiny tmpfs that fills up (ENOSPC),
  and a real read-only bind mount (EROFS). Elsewhere those two are skipped with the reason.
  (chmod cannot make a folder read-only for root, so it is used only when not running as root.)
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess

import pytest

from conftest import identity, identity_args, run_swarm, start_sn
from swarmlearn.errors import LedgerError
from swarmlearn.sn.client import SNClient

FSIZE_LIMIT = 160 << 10  # room for the genesis and some entries, then EFBIG


def start_sn_limited(procs, certs, data_dir, limit: int):
    def limited():  # soft limit only: the test may raise it again without privileges
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    proc = procs.swarm("sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0",
                       *identity_args(certs, "sn"), "--data-dir", str(data_dir), preexec_fn=limited)
    line = proc.wait_for_line("SN ready on ")
    return proc, line.split("SN ready on ")[1].split()[0]


def fill_until_refused(client: SNClient, prefix: str, at_most: int = 2000) -> tuple[int, LedgerError]:
    for i in range(at_most):
        try:
            client.submit("contract_create", {"name": f"{prefix}{i}"}, patience=5)
        except LedgerError as exc:
            return i, exc
    raise AssertionError(f"{at_most} entries and the SN never ran out of space")


def assert_clear_refusal(exc: LedgerError, data_dir, proc) -> None:
    message = str(exc)
    assert "refuses new entries" in message and str(data_dir / "ledger.db") in message, message
    assert "cannot write the ledger" in message and "free space" in message, message
    logged = proc.wait_for_line("the ledger cannot be written", timeout=5)
    assert str(data_dir) in logged and "contract_create" in logged, logged


def assert_verifies(data_dir, at_least: int) -> int:
    result = run_swarm("ledger", "verify", str(data_dir))
    assert result.returncode == 0 and result.stdout.startswith("OK "), result.stdout + result.stderr
    entries = int(result.stdout.split()[1])
    assert entries >= at_least, result.stdout
    return entries


@pytest.mark.slow
def test_a_full_disk_refuses_new_entries_clearly_and_the_sn_continues_when_space_returns(procs, certs, tmp_path):
    data = tmp_path / "sn"
    proc, address = start_sn_limited(procs, certs, data, FSIZE_LIMIT)
    with SNClient(address, identity(certs, "swci")) as swci:
        swci.register("SWCI")
        accepted, exc = fill_until_refused(swci, "c")
        assert accepted > 3
        assert_clear_refusal(exc, data, proc)
        # Still up: it answers queries with everything accepted so far, and refuses again, cleanly.
        state = swci.query("contracts")["contracts"]
        assert {f"c{i}" for i in range(accepted)} <= set(state) and f"c{accepted}" not in state
        with pytest.raises(LedgerError):
            swci.submit("contract_create", {"name": "still-full"}, patience=2)

        resource.prlimit(proc.popen.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        swci.submit("contract_create", {"name": "after-space-returned"})
        assert "after-space-returned" in swci.query("contracts")["contracts"]
    proc.kill()
    entries = assert_verifies(data, accepted + 3)  # genesis, SWCI, contracts, one after
    again = start_sn(procs, certs, data)  # and a restart reads it all back
    with SNClient(again.address, identity(certs, "swci")) as swci:
        assert "after-space-returned" in swci.query("contracts")["contracts"]
        assert swci.query("info")["info"]["head_index"] >= entries - 1


# ------------------------------------------------------------------------- with real mounts


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def _umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the RLIMIT_FSIZE test stands in for a full disk")
    result = _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the RLIMIT_FSIZE test stands in")
    yield mnt
    _umount(mnt)


@pytest.mark.slow
def test_a_real_full_tmpfs_refuses_new_entries_and_the_sn_continues_after_space_is_freed(procs, certs, tmp_path,
                                                                                         tiny_tmpfs):
    data = tiny_tmpfs / "sn"
    sn = start_sn(procs, certs, data)
    filler = tiny_tmpfs / "filler"
    with SNClient(sn.address, identity(certs, "swci")) as swci:
        swci.register("SWCI")
        free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
        filler.write_bytes(b"\0" * max(0, free - (96 << 10)))  # leave room for a few entries only
        accepted, exc = fill_until_refused(swci, "c")
        assert_clear_refusal(exc, data, sn.proc)
        assert "full" in str(exc) or "I/O" in str(exc), str(exc)
        filler.unlink()  # space returns
        swci.submit("contract_create", {"name": "after-space-returned"})
    sn.proc.kill()
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    assert_verifies(copy, accepted + 3)


@pytest.mark.slow
def test_an_sn_on_a_read_only_data_dir_refuses_clearly_and_a_writable_copy_continues(procs, certs, tmp_path):
    data = tmp_path / "sn"
    sn = start_sn(procs, certs, data)
    with SNClient(sn.address, identity(certs, "swci")) as swci:
        swci.register("SWCI")
        swci.submit("contract_create", {"name": "before"})
    sn.proc.kill()
    entries = assert_verifies(data, 3)
    before = {p.name: p.read_bytes() for p in data.iterdir()}

    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() != 0:
        read_only.rmdir()
        shutil.copytree(data, read_only)
        for path in (read_only, *read_only.iterdir()):
            path.chmod(0o555 if path.is_dir() else 0o444)
    else:
        bound = _mount("--bind", str(data), str(read_only))
        if bound.returncode != 0:
            pytest.skip(f"root, and cannot bind-mount read-only here ({bound.stderr.strip()}); chmod does not "
                        f"stop root")
        if _mount("-o", "remount,bind,ro", str(read_only)).returncode != 0:
            _umount(read_only)
            pytest.skip("cannot remount a bind mount read-only here")
    try:
        result = run_swarm("sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0",
                           *identity_args(certs, "sn"), "--data-dir", str(read_only), timeout=30)
        assert result.returncode != 0, result.stdout + result.stderr
        error = result.stderr.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: "), result.stderr
        assert str(read_only) in error[0] and re.search("read-?only", error[0]), error[0]
    finally:
        if os.geteuid() == 0:
            _umount(read_only)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name in before} == before  # untouched

    copy = tmp_path / "writable-copy"
    shutil.copytree(data, copy)
    again = start_sn(procs, certs, copy)
    with SNClient(again.address, identity(certs, "swci")) as swci:
        swci.submit("contract_create", {"name": "after"})
        assert {"before", "after"} <= set(swci.query("contracts")["contracts"])
    again.proc.kill()
    assert_verifies(copy, entries + 1)
