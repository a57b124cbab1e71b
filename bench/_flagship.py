"""Shared by benchmarks: the flagship model.py run as real ML processes, either alone
(SWARM_LOOPBACK=1: no SL, the local-only and pooled baselines) or in a real swarm (SN + one SL
process per node over mTLS on 127.0.0.1). Returns each node's metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench._swarm import LocalSwarm

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "huggingface-peft" / "model" / "model.py"
NODES = ["node1", "node2", "node3"]


def ml_env(node: str, data: Path, out: Path, settings: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "NODE_ID": node, "DATA_DIR": str(data), "MODEL_DIR": str(out), "MAX_EPOCHS": "1", "MIN_PEERS": "3",
            "TORCH_THREADS": "1", **settings}


def run_nodes(out: Path, data: Path, settings: dict[str, str], swarm: bool, nodes: list[str] = NODES,
              train_files: dict[str, str] | None = None) -> list[dict]:
    """Runs one model.py per node, all at once; under a fresh swarm if `swarm`, else each alone."""
    local = LocalSwarm(out / "swarm") if swarm else None
    processes: list[subprocess.Popen] = []
    logs = []
    out.mkdir(parents=True, exist_ok=True)
    try:
        envs = {n: ml_env(n, data, out, settings) for n in nodes}
        for n in nodes:
            if train_files and n in train_files:
                envs[n]["TRAIN_FILE"] = train_files[n]
            if local is None:
                envs[n]["SWARM_LOOPBACK"] = "1"
        if local is not None:
            local.start_sn()
            for n, address in local.start_sls(nodes).items():  # as the SWOP does: all at once
                envs[n]["SWARM_SL_ADDR"] = address
        for n in nodes:
            logs.append(open(out / f"{n}.log", "w"))
            processes.append(subprocess.Popen([sys.executable, str(MODEL)], env=envs[n], stdout=logs[-1],
                                              stderr=subprocess.STDOUT, cwd=MODEL.parent))
        codes = [p.wait(timeout=4 * 3600) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        if local is not None:
            local.stop()
    if any(codes):
        raise SystemExit(f"model.py exited {codes} in {out}; see {out}/node*.log")
    return [json.loads((out / n / "metrics.json").read_text()) for n in nodes]
