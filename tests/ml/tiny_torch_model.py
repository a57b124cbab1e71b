"""A user's plain-PyTorch model.py, as the tests run it on each node: a tiny regression net on this
node's own synthetic data, with snapshots of what it sent and received each round so the test can
recompute every merge independently.

Environment: NODE_ID, SWARM_SL_ADDR, OUT_DIR, and optionally SEED, STEPS, SYNC_FREQUENCY, MIN_PEERS,
MERGE_METHOD, WEIGHTAGE, BATCH, FAIL_AT_STEP, STEP_SLEEP.
"""

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from swarmlearn.torch import SwarmCallback

node = os.environ["NODE_ID"]
out = Path(os.environ["OUT_DIR"]) / node
out.mkdir(parents=True, exist_ok=True)
seed = int(os.environ.get("SEED", sum(map(ord, node))))
steps = int(os.environ.get("STEPS", "12"))
sync_frequency = int(os.environ.get("SYNC_FREQUENCY", "4"))
batch = int(os.environ.get("BATCH", "8"))
step_sleep = float(os.environ.get("STEP_SLEEP", "0"))
torch.manual_seed(seed)
torch.set_num_threads(1)

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
true_w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
x = torch.randn(256, 4) + seed % 7  # each node's data is shifted differently
y = x @ true_w + 0.1 * torch.randn(256, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

swarm = SwarmCallback(sync_frequency=sync_frequency, min_peers=int(os.environ.get("MIN_PEERS", "3")), model=model,
                      merge_method=os.environ.get("MERGE_METHOD", "mean"),
                      node_weightage=float(os.environ.get("WEIGHTAGE", "1")))


def snapshot(name: str) -> None:
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{name}.safetensors")


def synced(before_round: int) -> bool:
    return swarm.core.last_round != before_round


snapshot("pending")
swarm.on_train_begin()
(out / "pending.safetensors").rename(out / f"round{swarm.core.last_round}-sent.safetensors")
snapshot(f"round{swarm.core.last_round}-merged")

for step in range(steps):
    if os.environ.get("FAIL_AT_STEP") == str(step):
        print(f"{node}: failing on purpose at step {step}", flush=True)
        sys.exit(3)
    i = (step * batch) % len(x)
    loss = torch.nn.functional.mse_loss(model(x[i:i + batch]), y[i:i + batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    before = swarm.core.last_round
    snapshot("pending")
    swarm.on_batch_end(batch_size=batch, loss=loss.item())
    if synced(before):
        (out / "pending.safetensors").rename(out / f"round{swarm.core.last_round}-sent.safetensors")
        snapshot(f"round{swarm.core.last_round}-merged")
    if step_sleep:
        time.sleep(step_sleep)

before = swarm.core.last_round
snapshot("pending")
swarm.on_train_end()
(out / "pending.safetensors").rename(out / f"round{swarm.core.last_round}-sent.safetensors")
snapshot(f"round{swarm.core.last_round}-merged")
snapshot("final")
print(f"{node}: done after {swarm.core.rounds} syncs", flush=True)
