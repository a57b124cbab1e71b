"""A model.py written the way the original product's PyTorch examples are (mnist-pyt): camelCase
arguments, `swarmlearning.pyt`, a DataLoader as adsValData, lossFunction/metricFunction by name,
numbers given as strings, `swarmCallback.logger`, `on_batch_end(batchIdx)`. Tiny synthetic
classification data, made here. It imports nothing of swarmlearn's but the callback, so it also
runs in an environment that pins protobuf==3.15.6 (PROBE_PROTOBUF=1 reports what it found).

Environment: NODE_ID, SWARM_SL_ADDR, OUT_DIR; optionally MIN_PEERS, SYNC_FREQUENCY, EPOCHS, ADAPTIVE.
"""

import logging
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from swarmlearning.pyt import SwarmCallback

node = os.environ["NODE_ID"]
out = os.path.join(os.environ["OUT_DIR"], node)
os.makedirs(out, exist_ok=True)
max_epochs = int(os.environ.get("EPOCHS", "2"))
torch.manual_seed(sum(map(ord, node)))
torch.set_num_threads(1)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def make_data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


train_loader = DataLoader(make_data(96, sum(map(ord, node))), batch_size=8, shuffle=False)
test_loader = DataLoader(make_data(40, 7), batch_size=8, shuffle=False)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

swarmCallback = SwarmCallback(os.environ.get("SYNC_FREQUENCY", "4"), os.environ.get("MIN_PEERS", "2"),
                              "defaultbb.cqdb.sml.hpe", useAdaptiveSync=os.environ.get("ADAPTIVE") == "1",
                              adsValData=test_loader, adsValBatchSize="8", model=model, mergeMethod="MEAN",
                              nodeWeightage="50", totalEpochs=str(max_epochs), lossFunction="NLLLoss",
                              lossFunctionArgs={"reduction": "mean"}, metricFunction="Accuracy",
                              metricFunctionArgs={"task": "multiclass", "num_classes": 3})
swarmCallback.logger.setLevel(logging.DEBUG)
swarmCallback.logger.info("%s: starting with %d samples", node, len(train_loader.dataset))
swarmCallback.on_train_begin()
for epoch in range(1, max_epochs + 1):
    model.train()
    for batchIdx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        swarmCallback.on_batch_end(batchIdx)
    swarmCallback.on_epoch_end(epoch)
swarmCallback.on_train_end()

torch.save(model.state_dict(), os.path.join(out, "final.pt"))
heavy = sorted(m for m in ("grpc", "google.protobuf", "pydantic", "yaml", "ruamel", "cryptography", "safetensors")
               if m in sys.modules)
print(f"{node}: done; sync interval {swarmCallback.core.sync_interval}; heavy modules {heavy}", flush=True)
if os.environ.get("PROBE_PROTOBUF") == "1":  # what the task environment holds, once training is over
    import google.protobuf

    print(f"{node}: probe: protobuf {google.protobuf.__version__}", flush=True)
