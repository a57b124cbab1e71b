"""SwarmCallback for plain PyTorch training loops:

    swarm = SwarmCallback(sync_frequency=16, min_peers=3, model=model)
    swarm.on_train_begin()
    for epoch in range(epochs):
        for x, y in loader:
            ...; optimizer.step()
            swarm.on_batch_end(batch_size=len(x), loss=loss.item())
        swarm.on_epoch_end(epoch)
    swarm.on_train_end()
"""

from __future__ import annotations

from swarmlearn.callback.core import FINAL_MESSAGE, SwarmCore

__all__ = ["FINAL_MESSAGE", "SwarmCallback"]


class SwarmCallback:
    def __init__(self, sync_frequency: int = 16, min_peers: int = 2, model=None, **kwargs):
        if model is None and "model" not in kwargs:
            raise TypeError("SwarmCallback needs model=<your torch.nn.Module>")
        self.core = SwarmCore(model, sync_frequency=sync_frequency, min_peers=min_peers, **kwargs)

    @property
    def model(self):
        return self.core.model

    def on_train_begin(self) -> None:
        self.core.begin()

    def on_batch_end(self, batch_size: int = 1, loss: float | None = None) -> None:
        self.core.report(loss=loss)
        self.core.step(batch_size)

    def on_epoch_end(self, epoch: float | None = None, loss: float | None = None, metric: float | None = None) -> None:
        self.core.report(epoch=epoch, loss=loss, metric=metric)

    def on_train_end(self) -> None:
        self.core.end()
