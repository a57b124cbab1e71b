"""SwarmCallback for plain PyTorch training loops:

    swarm = SwarmCallback(sync_frequency=16, min_peers=3, model=model, val_data=(x_val, y_val))
    swarm.on_train_begin()
    for epoch in range(epochs):
        for x, y in loader:
            ...; optimizer.step()
            swarm.on_batch_end(batch_size=len(x), loss=loss.item())
        swarm.on_epoch_end(epoch)
    swarm.on_train_end()

Every sync after training records the mean of the losses passed to on_batch_end since the last
sync. With validation (`val_data`, or a `validate` function of the model returning {name: value}),
each merged model is measured as soon as it is loaded, and that is recorded too.
"""

from __future__ import annotations

from swarmlearn.callback.core import FINAL_MESSAGE, SwarmCore
from swarmlearn.errors import ConfigError

__all__ = ["FINAL_MESSAGE", "SwarmCallback", "measure"]

DEFAULT_VAL_BATCH_SIZE = 64


class SwarmCallback:
    def __init__(self, sync_frequency: int = 16, min_peers: int = 2, model=None, optimizer=None, **kwargs):
        """`optimizer`: yours, for merge_method="lora_exact" to reset its moments of the LoRA factors each
        merge re-factors (without it they are kept, describing a basis the factors left)."""
        if model is None and "model" not in kwargs:
            raise TypeError("SwarmCallback needs model=<your torch.nn.Module>")
        self.core = SwarmCore(model, sync_frequency=sync_frequency, min_peers=min_peers, **kwargs)
        self.core.optimizer = optimizer
        use_validation_data(self.core)

    @property
    def logger(self):
        """The logger this callback writes to (the original's `.logger`): set its level as you like."""
        return self.core.log

    @property
    def model(self):
        return self.core.model

    def track_privacy(self, account) -> None:
        """Records the ε this node has spent (at its δ) with each train entry: the PrivacyAccount of
        swarmlearn.dp.make_private (or pass it as `privacy=` when the callback is made)."""
        self.core.track_privacy(account)

    def on_train_begin(self) -> None:
        self.core.begin()

    def on_batch_end(self, batch_size: int = 1, loss: float | None = None) -> None:
        self.core.add_loss(loss)
        self.core.step(batch_size)

    def on_epoch_end(self, epoch: float | None = None, loss: float | None = None, metric: float | None = None) -> None:
        """`epoch` tags the entries recorded from now on. `loss` and `metric` are accepted for older
        model.py files and not recorded: they describe the local model before the next merge."""
        if epoch is not None:
            self.core.epoch = float(epoch)

    def on_train_end(self) -> None:
        self.core.end()


def use_validation_data(core: SwarmCore) -> None:
    """Makes `val_data` the validation of each merged model: measured with the loss and metric
    classes the settings name (torch.nn's loss, torchmetrics' metric or a built-in one), else with
    `measure`'s defaults. Adaptive sync needs such a validation."""
    settings = core.settings
    if settings.val_data is not None and settings.validate is None:
        batches = _batches(settings.val_data, settings.val_batch_size or DEFAULT_VAL_BATCH_SIZE)
        if settings.loss_function or settings.metric_function:
            from swarmlearn.callback.functions import ValidationFunctions

            functions = ValidationFunctions(settings.loss_function, settings.loss_function_args,
                                            settings.metric_function, settings.metric_function_args)
            settings.validate = lambda m: functions.measure(m, batches)
        else:
            settings.validate = lambda m: measure(m, batches)
    elif settings.loss_function or settings.metric_function:
        raise ConfigError("lossFunction/metricFunction measure the merged model on adsValData (val_data): give "
                          "adsValData=<a DataLoader of (inputs, targets)> too")
    if settings.adaptive_sync and settings.validate is None:
        raise ConfigError("useAdaptiveSync adapts the sync interval to the merged model's validation loss: give "
                          "adsValData (val_data) and adsValBatchSize, or a validate function")


def _batches(data, batch_size: int):
    """`val_data` as batches of (inputs, targets): a DataLoader as it is, a Dataset of such pairs, or
    a pair (inputs, targets) of tensors or arrays with one row per sample."""
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, DataLoader):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        inputs, targets = (torch.as_tensor(part) for part in data)
        if len(inputs) != len(targets):
            raise ConfigError(f"val_data: {len(inputs)} inputs but {len(targets)} targets; give one target per input")
        data = TensorDataset(inputs, targets)
    if not isinstance(data, Dataset) and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise ConfigError(f"val_data is a {type(data).__name__}; give a DataLoader, a Dataset of (input, target) "
                          f"pairs or a tuple (inputs, targets), or pass validate=<function of the model>")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def measure(model, batches) -> dict[str, float]:
    """The model on validation batches of (inputs, targets). Integer targets are classes: accuracy of
    the highest output and mean cross-entropy; other targets: mean squared error (as metric "mse")."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = correct = elements = 0
    loss_sum = 0.0
    classes = True
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                outputs, targets = model(inputs.to(device)), targets.to(device)
                classes = not targets.dtype.is_floating_point
                if classes:
                    loss_sum += F.cross_entropy(outputs, targets, reduction="sum").item()
                    correct += (outputs.argmax(dim=-1) == targets).sum().item()
                else:
                    loss_sum += F.mse_loss(outputs.reshape(targets.shape), targets, reduction="sum").item()
                samples += len(targets)
                elements += targets.numel()
    finally:
        model.train(was_training)
    if not samples:
        raise ConfigError("val_data holds no samples")
    if classes:
        return {"accuracy": correct / samples, "loss": loss_sum / samples}
    return {"mse": loss_sum / elements, "loss": loss_sum / elements}
