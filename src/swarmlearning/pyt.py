"""The original's PyTorch callback, `from swarmlearning.pyt import SwarmCallback`:

    swarmCallback = SwarmCallback(syncFrequency=128, minPeers=2, useAdaptiveSync=False,
                                  adsValData=testLoader, adsValBatchSize=64, model=model,
                                  lossFunction="NLLLoss", lossFunctionArgs={}, metricFunction="Accuracy",
                                  metricFunctionArgs={"task": "multiclass", "num_classes": 10}, totalEpochs=5)
    swarmCallback.logger.info("starting")
    swarmCallback.on_train_begin()
    ... each batch: swarmCallback.on_batch_end()    ... each epoch: swarmCallback.on_epoch_end(epoch)
    swarmCallback.on_train_end()

As in the original, every batch counts the same in the merge weights (it is not told the batch
size); `on_batch_end(batch_size=..., loss=...)` may say more: the samples then weigh, and the mean
training loss since each sync is recorded.
"""

from __future__ import annotations

from swarmlearn import torch as _torch
from swarmlearning._compat import DEFAULT_TRAINING_CONTRACT, core_kwargs

__all__ = ["DEFAULT_TRAINING_CONTRACT", "SwarmCallback"]


class SwarmCallback(_torch.SwarmCallback):
    def __init__(self, syncFrequency, minPeers, trainingContract=DEFAULT_TRAINING_CONTRACT, **kwargs):  # noqa: N803
        model = kwargs.pop("model", None)
        if model is None:
            raise TypeError("SwarmCallback needs model=<your torch.nn.Module>")
        super().__init__(model=model, **core_kwargs(syncFrequency, minPeers, trainingContract, kwargs, ("PYTORCH",)))
        self.epochsCompleted = 0

    def on_train_begin(self) -> None:
        self.core.begin()

    def on_batch_end(self, batch=None, *, batch_size: int = 1, loss: float | None = None) -> None:
        """`batch` (its index, as the original takes it) is not needed."""
        self.core.add_loss(loss)
        self.core.step(batch_size)

    def on_epoch_end(self, epoch=None) -> None:
        """Counts a finished epoch (as the original does, whatever `epoch` says): the entries
        recorded from now on carry it, and with totalEpochs, the progress."""
        self.epochsCompleted += 1
        self.core.epoch = float(self.epochsCompleted)

    def on_train_end(self) -> None:
        self.core.end()
