"""The model.py each emulated host's SWOP runs in tests/test_multihost.py: a tiny torch regression on
this node's own synthetic data, trained on the contract CONTRACT (one per test, so runs on one ledger
never share rounds), its final weights saved as OUT_DIR/<node>/final.safetensors.

Environment: NODE_ID and SWARM_SL_ADDR (from its SWOP), OUT_DIR, CONTRACT, and optionally STEPS,
SYNC_FREQUENCY, MIN_PEERS, STEP_SLEEP (seconds per step: how long training lasts) and TRAIN_SECONDS:
training then also ends that long after it began, by the clock, so every node of a swarm ends at about
the same time, a node cut off for a while included (it trains only for what is left of that time once
it is back), instead of the others waiting for all the steps it missed.
"""

import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from swarmlearn.torch import SwarmCallback

node = os.environ["NODE_ID"]
out = Path(os.environ["OUT_DIR"]) / node
out.mkdir(parents=True, exist_ok=True)
steps = int(os.environ.get("STEPS", "12"))
step_sleep = float(os.environ.get("STEP_SLEEP", "0"))
train_seconds = float(os.environ.get("TRAIN_SECONDS", "0"))
seed = sum(map(ord, node))
torch.manual_seed(seed)
torch.set_num_threads(1)

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
x = torch.randn(128, 4) + seed % 7  # each node's data is shifted differently
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(128, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
swarm = SwarmCallback(sync_frequency=int(os.environ.get("SYNC_FREQUENCY", "2")),
                      min_peers=int(os.environ.get("MIN_PEERS", "3")), model=model,
                      training_contract=os.environ["CONTRACT"])

swarm.on_train_begin()
ends_at = time.monotonic() + train_seconds if train_seconds else float("inf")
for step in range(steps):
    if time.monotonic() >= ends_at:
        break
    i = (step * 8) % len(x)
    loss = torch.nn.functional.mse_loss(model(x[i:i + 8]), y[i:i + 8])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    swarm.on_batch_end(batch_size=8, loss=loss.item())
    time.sleep(step_sleep)
swarm.on_train_end()
save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "final.safetensors")
print(f"{node}: done after {swarm.core.rounds} syncs", flush=True)
