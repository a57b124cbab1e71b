"""One node of the Byzantine test: logistic regression on linearly separable synthetic data, trained on
each contract the test names, side by side (each contract has its own SL for this node), with
the accuracy of each contract's final model on a shared test set written to OUT_DIR/<contract>/<NODE_ID>.json.

With ATTACK=1 the node is Byzantine: every sync it sends base - 5 x (trained - base), where base is the
merged model it last loaded, i.e. its real update sign-flipped and scaled x5. Its parameter norm stays
within a few times the others', so the leader's norm filter keeps it.

Environment: NODE_ID (its data), OUT_DIR, RUNS (a JSON list of {"contract", "merge_method", "sl",
"peers"}), ATTACK, and optionally ROUNDS, STEPS (per round), BATCH, LR.
"""

import json
import os
import sys
import threading
from pathlib import Path

import torch

from swarmlearn.torch import SwarmCallback

FEATURES = 10
MODEL_SEED = 7  # every node starts from the same weights
TEST_SEED = 999
SCALE = 5.0  # the attacker's factor

node = os.environ["NODE_ID"]
out = Path(os.environ["OUT_DIR"])
attack = os.environ.get("ATTACK") == "1"
rounds = int(os.environ.get("ROUNDS", "10"))
steps = int(os.environ.get("STEPS", "4"))
batch = int(os.environ.get("BATCH", "32"))
lr = float(os.environ.get("LR", "0.2"))
torch.set_num_threads(1)

# The true separating hyperplane, shared by every node: the label is the side a point lies on.
true_w = torch.arange(1, FEATURES + 1, dtype=torch.float32) * torch.tensor([(-1.0) ** i for i in range(FEATURES)])


def separable(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(count, FEATURES, generator=torch.Generator().manual_seed(seed))
    return x, (x @ true_w > 0).long()


x_train, y_train = separable(sum(map(ord, node)), rounds * steps * batch)
x_test, y_test = separable(TEST_SEED, 2000)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def poison(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> None:
    """The sign-flipped x5 copy of the update since `base`, in place of the trained parameters."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value.copy_(base[name] - SCALE * (value - base[name]))


class Run:
    """This node's training on one contract, with its own model, optimizer and SwarmCallback."""

    def __init__(self, contract: str, merge_method: str, sl: str, peers: int):
        self.contract, self.merge_method = contract, merge_method
        torch.manual_seed(MODEL_SEED)
        self.model = torch.nn.Linear(FEATURES, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        os.environ["SWARM_SL_ADDR"] = sl  # read once, as the callback joins in on_train_begin
        self.swarm = SwarmCallback(sync_frequency=steps, min_peers=peers, model=self.model,
                                   merge_method=merge_method, training_contract=contract)
        self.swarm.on_train_begin()

    def train(self) -> None:
        model, swarm = self.model, self.swarm
        base = state(model)
        for step in range(rounds * steps):
            i = step * batch
            loss = torch.nn.functional.cross_entropy(model(x_train[i:i + batch]), y_train[i:i + batch])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if attack and swarm.core.steps_since_sync + 1 >= swarm.core.sync_interval:
                poison(model, base)  # this step syncs: what is sent is the attack
            synced = swarm.core.rounds
            swarm.on_batch_end(batch_size=batch, loss=loss.item())
            if swarm.core.rounds != synced:
                base = state(model)
        swarm.on_train_end()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
        (out / self.contract).mkdir(parents=True, exist_ok=True)
        (out / self.contract / f"{node}.json").write_text(json.dumps({"accuracy": accuracy}))
        print(f"{node}: contract {self.contract} ({self.merge_method}) ends at test accuracy {accuracy:.4f}",
              flush=True)


# Joined one contract after the other (each join waits for the contract's first round, which every node
# joins in the same order); then trained side by side, one thread each.
runs = [Run(r["contract"], r["merge_method"], r["sl"], r["peers"]) for r in json.loads(os.environ["RUNS"])]
failures = []


def train(run: Run) -> None:
    try:
        run.train()
    except BaseException as exc:
        failures.append(f"{run.contract}: {exc!r}")
        raise


threads = [threading.Thread(target=train, args=(run,)) for run in runs]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
if failures:
    sys.exit(f"{node}: training failed on {'; '.join(failures)}")
