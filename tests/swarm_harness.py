"""Starts a swarm the way a user does by hand: a sentinel SN, one `swarm sl` per node, and the
user's model.py per node with SWARM_SL_ADDR pointing at its SL. Every process is stopped by pid."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conftest import Proc, Procs, RunningSN, identity_args, start_sn
from swarmlearn.pki import CertLayout

ML_DIR = Path(__file__).parent / "ml"


@dataclass
class Node:
    node_id: str
    sl: Proc
    ml_addr: str
    ml: Proc | None = None


@dataclass
class Swarm:
    sn: RunningSN
    nodes: dict[str, Node] = field(default_factory=dict)
    out_dir: Path | None = None


def start_sl(procs: Procs, certs: CertLayout, sn: RunningSN, node_id: str, work: Path, *extra: str,
             env: dict[str, str] | None = None) -> Node:
    host, port = sn.address.rsplit(":", 1)
    sl = procs.swarm("sl", "--sn-ip", host, "--sn-api-port", port, "--sl-fs-port", "0", *identity_args(certs, "sl", node_id),
                     "--node-id", node_id, "--data-dir", str(work / f"sl-{node_id}"), *extra,
                     env=env or {})
    line = sl.wait_for_line(f"SL {node_id} ready: SWARM_SL_ADDR=")
    return Node(node_id, sl, line.split("SWARM_SL_ADDR=")[1].strip())


def start_ml(procs: Procs, node: Node, script: str, out_dir: Path, env: dict[str, str]) -> Proc:
    node.ml = procs.start([sys.executable, str(ML_DIR / script)], env={
        "NODE_ID": node.node_id, "SWARM_SL_ADDR": node.ml_addr, "OUT_DIR": str(out_dir), **env})
    return node.ml


def start_swarm(procs: Procs, certs: CertLayout, work: Path, nodes: list[str], script: str,
                env: dict[str, str] | None = None, sl_args: tuple[str, ...] = ("--checkin-wait", "1"),
                node_env: dict[str, dict[str, str]] | None = None) -> Swarm:
    swarm = Swarm(start_sn(procs, certs, work / "sn"), out_dir=work / "out")
    for node_id in nodes:
        swarm.nodes[node_id] = start_sl(procs, certs, swarm.sn, node_id, work, *sl_args)
    for node_id in nodes:
        start_ml(procs, swarm.nodes[node_id], script, swarm.out_dir,
                 {**(env or {}), **((node_env or {}).get(node_id, {}))})
    return swarm


def everything(swarm: Swarm) -> str:
    """All output of the swarm's processes, for a failing test's message."""
    parts = [f"--- SN\n{swarm.sn.proc.output}"]
    for node in swarm.nodes.values():
        parts.append(f"--- {node.node_id} SL\n{node.sl.output}")
        if node.ml is not None:
            parts.append(f"--- {node.node_id} ML\n{node.ml.output}")
    return "\n".join(parts)


def wait_ml(swarm: Swarm, nodes: list[str] | None = None, timeout: float = 90) -> None:
    for node_id in nodes or list(swarm.nodes):
        ml = swarm.nodes[node_id].ml
        try:
            code = ml.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{node_id} ML still running after {timeout} s\n{everything(swarm)}") from None
        ml._thread.join(timeout=5)
        assert code == 0, f"{node_id} ML exited {code}:\n{ml.output}\n--- its SL:\n{swarm.nodes[node_id].sl.output}"


def stuck_sync(node: Node) -> tuple[threading.Thread, list]:
    """An ML that joins needing a second peer that never comes and syncs in a thread: it waits in
    round 1 until its SL goes away. Returns the thread and the list its outcome (None or the
    SwarmError it got) lands in, once the SL has logged its check-in."""
    from swarmlearn.callback.core import SLChannel
    from swarmlearn.errors import SwarmError
    from swarmlearn.tensors import Tensor, encode

    channel = SLChannel(node.ml_addr, ready_timeout=5)
    channel.join("default", 2, 1.0, "mean")
    outcome: list = []

    def sync() -> None:
        try:
            channel.sync(encode({"w": Tensor("F32", np.ones(4, dtype=np.float32))}), 1.0)
            outcome.append(None)
        except SwarmError as exc:
            outcome.append(exc)
        finally:
            channel.close()

    waiter = threading.Thread(target=sync, daemon=True)
    waiter.start()
    node.sl.wait_for_line("checked in")
    return waiter, outcome
