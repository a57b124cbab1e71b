"""A user's plain-PyTorch model.py with record-level DP-SGD (swarmlearn.dp.make_private): a tiny
classifier on this node's own synthetic data, trained with the user's SGD made private by Opacus,
the PrivacyAccount handed to the SwarmCallback so every sync records ε spent.

Environment: NODE_ID, SWARM_SL_ADDR, OUT_DIR, and optionally EPOCHS, SYNC_FREQUENCY, MIN_PEERS,
TARGET_EPSILON, DELTA.
"""

import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from swarmlearn.dp import make_private
from swarmlearn.torch import SwarmCallback

node = os.environ["NODE_ID"]
out = Path(os.environ["OUT_DIR"]) / node
out.mkdir(parents=True, exist_ok=True)
epochs = int(os.environ.get("EPOCHS", "2"))
torch.manual_seed(sum(map(ord, node)))
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(message)s")  # the callback's lines, ε spent among them

x = torch.randn(320, 6)
y = (x[:, 0] - x[:, 1] > 0).long()
net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
loader = DataLoader(TensorDataset(x, y), batch_size=32)
# Opacus's wrapper trains `net` itself: the callback moves net's tensors, under their own names.
model, optimizer, loader, account = make_private(net, optimizer, loader,
                                                 target_epsilon=float(os.environ.get("TARGET_EPSILON", "4")),
                                                 delta=float(os.environ.get("DELTA", "1e-4")), epochs=epochs,
                                                 max_grad_norm=1.0)
swarm = SwarmCallback(sync_frequency=int(os.environ.get("SYNC_FREQUENCY", "5")),
                      min_peers=int(os.environ.get("MIN_PEERS", "2")), model=net, privacy=account,
                      val_data=(x[:64], y[:64]))
swarm.on_train_begin()
for epoch in range(epochs):
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        swarm.on_batch_end(batch_size=len(targets), loss=loss.item())
    swarm.on_epoch_end(epoch)
swarm.on_train_end()
(out / "privacy.json").write_text(json.dumps({"epsilon": account.epsilon(), "delta": account.delta,
                                              "steps": account.steps, "target": account.target_epsilon}))
print(f"{node}: done, {account.describe()}", flush=True)
