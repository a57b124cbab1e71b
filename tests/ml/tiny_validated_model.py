"""A user's plain-PyTorch model.py that gives validation data: a tiny 3-class classifier on this
node's own synthetic data, with a held-out set of its own passed as `val_data`, so every merged
model is measured on the node. At the end it saves the final model and its validation set, for the
test to measure the swarm's final model itself.

Environment: NODE_ID, SWARM_SL_ADDR, OUT_DIR, and optionally STEPS, SYNC_FREQUENCY, MIN_PEERS,
SWARM_TENSORBOARD_DIR.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

FEATURES, CLASSES = 6, 3


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES))


def node_data(node: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around three class centres, drawn from the node's own generator and shifted per node."""
    g = torch.Generator().manual_seed(sum(map(ord, node)))
    centres = torch.tensor([[2.0] * FEATURES, [-2.0] * FEATURES, [2.0, -2.0] * (FEATURES // 2)])
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = centres[labels] + 1.5 * torch.randn(n, FEATURES, generator=g) + 0.3 * (sum(map(ord, node)) % 5)
    return x, labels


def main() -> None:
    from swarmlearn.torch import SwarmCallback

    torch.set_num_threads(1)
    node = os.environ["NODE_ID"]
    out = Path(os.environ["OUT_DIR"]) / node
    out.mkdir(parents=True, exist_ok=True)
    steps, batch = int(os.environ.get("STEPS", "14")), 16
    model = build_model()
    x, y = node_data(node, steps * batch + 64)
    x_train, y_train, x_val, y_val = x[:steps * batch], y[:steps * batch], x[steps * batch:], y[steps * batch:]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    swarm = SwarmCallback(sync_frequency=int(os.environ.get("SYNC_FREQUENCY", "4")),
                          min_peers=int(os.environ.get("MIN_PEERS", "3")), model=model, val_data=(x_val, y_val),
                          val_batch_size=24)
    swarm.on_train_begin()
    for step in range(steps):
        inputs, targets = x_train[step * batch:(step + 1) * batch], y_train[step * batch:(step + 1) * batch]
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        swarm.on_batch_end(batch_size=batch, loss=loss.item())
    swarm.on_epoch_end(0)
    swarm.on_train_end()
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
    save_file({"x": x_val, "y": y_val}, str(out / "validation.safetensors"))
    print(f"{node}: done after {swarm.core.rounds} syncs", flush=True)


if __name__ == "__main__":
    main()
