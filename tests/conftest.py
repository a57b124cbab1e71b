"""Shared fixtures: real certificates from gen-cert, and real `swarm` processes stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from swarmlearn.pki import CertLayout, Identity, generate_host_certs

SWARM = [sys.executable, "-m", "swarmlearn.cli"]


# The training nodes tests run: each has its own certificate, named after it (its node id).
NODES = [f"node{i}" for i in range(10)] + ["mallory", "attacker", "alice", "bob"]


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> CertLayout:
    """Organization "test": host 1's CA, its component certificates and one per training node, made
    once per test session."""
    root = tmp_path_factory.mktemp("cert")
    generate_host_certs(root, 1, org="test", nodes=NODES)
    return CertLayout(root, 1)


@pytest.fixture(scope="session")
def foreign_certs(tmp_path_factory) -> CertLayout:
    """A second, unrelated CA and its certificates: nobody in the swarm trusts them."""
    root = tmp_path_factory.mktemp("foreign")
    generate_host_certs(root, 9, org="foreign", nodes=NODES)
    return CertLayout(root, 9)


def _files(layout: CertLayout, component: str, node: str | None) -> tuple[Path, Path]:
    if component == "sl":
        node = node or "node1"
        return layout.node_key(node), layout.node_cert(node)
    return layout.key(component), layout.cert(component)


def identity(layout: CertLayout, component: str, node: str | None = None) -> Identity:
    """A component's identity; for "sl", the certificate of training node `node` (default node1)."""
    key, cert = _files(layout, component, node)
    return Identity.load(key, cert, layout.capath)


def identity_args(layout: CertLayout, component: str, node: str | None = None) -> list[str]:
    key, cert = _files(layout, component, node)
    return ["--key", str(key), "--cert", str(cert), "--capath", str(layout.capath)]


@dataclass
class Proc:
    """A `swarm` subprocess whose output is collected line by line."""

    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    _new_line: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self) -> None:
        for line in self.popen.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for_line(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self.popen.poll() is not None and not self._pumping():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._new_line.wait(min(remaining, 0.2))
        raise AssertionError(f"no line with {needle!r} within {timeout}s; output so far:\n" + "\n".join(self.lines))

    def _pumping(self) -> bool:
        return self._thread.is_alive()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
        self.popen.wait(timeout=15)
        self._thread.join(timeout=5)


class Procs:
    """Starts processes for one test and stops every one of them, by pid, at its end."""

    def __init__(self) -> None:
        self.started: list[Proc] = []
        # Workspaces whose recorded processes (started by a SWOP under test) are stopped at the end.
        self.workspaces: list[Path] = []

    def start(self, args: list[str], **kwargs) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
        popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                 **kwargs)
        proc = Proc(popen)
        proc._thread = threading.Thread(target=proc._pump, daemon=True)
        proc._thread.start()
        self.started.append(proc)
        return proc

    def swarm(self, *args: str, **kwargs) -> Proc:
        return self.start([*SWARM, *args], **kwargs)

    def stop_all(self) -> None:
        from swarmlearn.swop.runtime import stop_recorded

        for workspace in self.workspaces:
            stop_recorded(workspace, grace=5)
        # Newest first: SLs and operators go before the SN they talk to, as a user would stop them.
        for proc in reversed(self.started):
            if proc.popen.poll() is None:
                os.kill(proc.popen.pid, signal.SIGTERM)
                try:
                    proc.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for proc in self.started:
            if proc.popen.poll() is None:
                os.kill(proc.popen.pid, signal.SIGTERM)
        for proc in self.started:
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()


def run_swarm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SWARM, *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class RunningSN:
    proc: Proc
    address: str
    data_dir: Path


def start_sn(procs: Procs, certs: CertLayout, data_dir: Path, *extra: str) -> RunningSN:
    proc = procs.swarm("sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0",
                       *identity_args(certs, "sn"), "--data-dir", str(data_dir), *extra)
    line = proc.wait_for_line("SN ready on ")
    address = line.split("SN ready on ")[1].split()[0]
    return RunningSN(proc, address, data_dir)


@pytest.fixture
def sn(procs, certs, tmp_path) -> RunningSN:
    return start_sn(procs, certs, tmp_path / "sn")


def module_sn(certs: CertLayout, data_dir: Path):
    """A sentinel SN for a module-scoped fixture to yield: started here, stopped by pid when the
    fixture's generator ends (`yield from module_sn(...)`)."""
    procs = Procs()
    try:
        yield start_sn(procs, certs, data_dir)
    finally:
        procs.stop_all()


def finish_run(run: Proc, timeout: float) -> None:
    """Waits for a `swarm run` process to end, and fails the test with its output unless it ended
    within `timeout` seconds with exit code 0."""
    try:
        code = run.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"swarm run still running after {timeout} s; its output:\n{run.output}")
    assert code == 0, run.output
    run._thread.join(5)


def wait_until(condition, timeout: float = 10.0, every: float = 0.01) -> bool:
    """Whether `condition()` became true within `timeout` seconds (checked every `every` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
