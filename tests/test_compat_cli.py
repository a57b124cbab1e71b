"""The original's launch scripts as a user of it types them: `run-sn`, `run-swop`, `run-sl`, `run-swci`
with its Docker-era flags, then `stop-swarm`, which stops exactly what they started."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from importlib import import_module
from pathlib import Path

import psutil
import pytest

from conftest import identity_args
from swarmlearn.compat_cli import HOME_ENV, CompatError, stop_main, translate
from test_swop_swci import make_project

ROOT = Path(__file__).resolve().parents[1]
COMPAT = [sys.executable, "-m", "swarmlearn.compat_cli"]


def test_every_original_script_is_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("run-sn", "run-sl", "run-swop", "run-swci", "stop-swarm"):
        module, _, function = scripts[name].partition(":")
        assert callable(getattr(import_module(module), function)), name


def test_an_original_run_sn_line_becomes_a_sentinel_sn_and_says_what_it_ignores(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    launch = translate("run-sn", [
        "-d", "--rm", "--name=sn1", "--network=host-1-net", "--host-ip=127.0.0.1", "--sn-p2p-port=30303",
        "--sn-api-port=30304", "--key=k.pem", "--cert", "c.pem", "--cacert=ca.pem", "--apls-ip", "10.0.0.9",
        "-e", "SN_START_MINING=1", "-v", "/a:/b", "-it", "--sn-fs-port=30305"])
    assert launch.detach and launch.name == "sn1" and launch.env == {"SN_START_MINING": "1"}
    assert launch.args == ["--host-ip", "127.0.0.1", "--sn-api-port", "30304", "--key", "k.pem", "--cert", "c.pem",
                           "--capath", "ca.pem", "--sentinel", "--data-dir", str(tmp_path / "run" / "sn" / "sn1" / "data")]
    ignored = "; ".join(launch.ignored)
    for said in ("--network host-1-net", "--apls-ip 10.0.0.9 (swarmlearn needs no licence server)", "-v /a:/b", "-it",
                 "--rm", "--sn-fs-port 30305 (an SN serves no files", "--sn-p2p-port 30303 (a lone sentinel"):
        assert said in ignored
    joining = translate("run-sn", ["--host-ip=127.0.0.2", "--sentinel-ip=127.0.0.1", "--sn-p2p-port=30303"])
    assert joining.args[:4] == ["--host-ip", "127.0.0.2", "--sentinel-ip", "127.0.0.1"]
    assert "--sn-p2p-port" in joining.args and joining.args[joining.args.index("--ledger") + 1] == "etcd"
    with pytest.raises(CompatError, match="--socket-path is not supported: SPIFFE"):
        translate("run-sl", ["--socket-path", "/run/spire.sock"])
    with pytest.raises(CompatError, match="unknown flag --frobnicate; `swarm swop --help` lists ours"):
        translate("run-swop", ["--frobnicate", "1"])
    service = translate("run-sl", ["--sn-api-service", "api.sn-1.swarm:30304", "--ml-image", "user-env",
                                   "--checkin-wait", "1"])
    assert service.args == ["--sn-ip", "api.sn-1.swarm:30304", "--checkin-wait", "1"]  # ours pass through
    assert "--ml-image user-env (the ML program is not a container here" in service.ignored[0]


def _wait_in_log(log: Path, pattern: str, timeout: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {log} within {timeout} s:\n{log.read_text() if log.exists() else ''}")


def _gone(pid: int) -> bool:
    """Ended: no such process, or one waiting to be reaped (a detached process's parent has exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _pid(home: Path, component: str, name: str) -> int:
    return int((home / "run" / component / "pids" / f"{name}.pid").read_text().split()[0])


def test_run_scripts_start_a_swarm_in_the_background_and_stop_swarm_stops_it(certs, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(home))
    env = {**os.environ, HOME_ENV: str(home)}
    usr = make_project(tmp_path, certs)
    try:
        sn = subprocess.run([*COMPAT, "run-sn", "-d", "--rm", "--name=sn1", "--network=host-1-net",
                             "--host-ip=127.0.0.1", "--sentinel", "--sn-p2p-port=30303", "--sn-api-port=0",
                             *identity_args(certs, "sn"), "--apls-ip=127.0.0.1"],
                            capture_output=True, text=True, timeout=60, env=env)
        assert sn.returncode == 0, sn.stdout + sn.stderr
        assert "run-sn: accepted and ignored: --rm (" in sn.stderr and "--apls-ip 127.0.0.1 (" in sn.stderr
        port = _wait_in_log(home / "run" / "sn" / "logs" / "sn1.log", r"SN ready on 127\.0\.0\.1:(\d+)").group(1)

        swop = subprocess.run([*COMPAT, "run-swop", "-d", "--name=swop1", "--network=host-1-net", "--usr-dir", str(usr),
                               "--profile-file-name=swop_profile.yaml", "--sn-ip=127.0.0.1", f"--sn-api-port={port}",
                               *identity_args(certs, "swop"), "-e", "http_proxy=", "--apls-ip=127.0.0.1"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert swop.returncode == 0, swop.stdout + swop.stderr
        _wait_in_log(home / "run" / "swop" / "logs" / "swop1.log", "SWOP swop-1 ready")

        sl = subprocess.run([*COMPAT, "run-sl", "-d", "--name=sl1", "--host-ip=127.0.0.1", "--sn-ip=127.0.0.1",
                             f"--sn-api-port={port}", "--sl-fs-port=0", *identity_args(certs, "sl", "node9"),
                             "--ml-image=user-env", "--sn-docker-name=sn1"], capture_output=True, text=True,
                            timeout=60, env=env)
        assert sl.returncode == 0, sl.stdout + sl.stderr
        _wait_in_log(home / "run" / "sl" / "logs" / "sl1.log", "SL node9 ready")

        (usr / "swci" / "compat-init").write_text("LIST TASKRUNNERS\nLIST NODES\nEXIT\n")
        swci = subprocess.run([*COMPAT, "run-swci", "--rm", "--name=swci1", "--usr-dir", str(usr / "swci"),
                               "--init-script-name=compat-init", *identity_args(certs, "swci"), "--sn-ip=127.0.0.1",
                               f"--sn-api-port={port}", "-e", "SWCI_TASK_MAX_WAIT_TIME=5"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert swci.returncode == 0, swci.stdout + swci.stderr
        assert "SWOPs 1 (capacity 3)" in swci.stdout and "node9" in swci.stdout

        sn_pid, swop_pid, sl_pid = (_pid(home, "sn", "sn1"), _pid(home, "swop", "swop1"), _pid(home, "sl", "sl1"))
        assert stop_main(["--sl", "--keep"]) == 0
        assert _gone(sl_pid) and not _gone(sn_pid) and not _gone(swop_pid)
    finally:
        stopped = subprocess.run([*COMPAT, "stop-swarm", "--all"], capture_output=True, text=True, timeout=60, env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped swop swop1 (pid" in stopped.stdout and "stopped sn sn1 (pid" in stopped.stdout
    assert _gone(sn_pid) and _gone(swop_pid)
    assert "nothing was running" in subprocess.run([*COMPAT, "stop-swarm"], capture_output=True, text=True,
                                                   timeout=60, env=env).stdout
