"""The original's lossFunction/metricFunction for PyTorch: a loss class of torch.nn and a metric
class of torchmetrics, named by string and built with the given keyword arguments, measure each
merged model on the validation data.

torchmetrics is used where it is installed, as the original does. Without it the commonest
metrics are built in (BUILT_IN), so that a task environment need not install torchmetrics for them;
any other name is refused at once, naming the package to install.
"""

from __future__ import annotations

from swarmlearn.errors import ConfigError


class _Accuracy:
    """torchmetrics.Accuracy's reading: multiclass (argmax of the outputs) or binary/multilabel
    (outputs above `threshold`, after a sigmoid where they are not probabilities)."""

    def __init__(self, task: str | None = None, threshold: float = 0.5, **_ignored):
        self.task = task
        self.threshold = threshold
        self.correct = self.count = 0

    def update(self, outputs, targets) -> None:
        import torch

        binary = self.task in ("binary", "multilabel") or (self.task is None and outputs.shape == targets.shape)
        if binary:
            probabilities = outputs if outputs.min() >= 0 and outputs.max() <= 1 else torch.sigmoid(outputs)
            predicted = (probabilities > self.threshold).to(targets.dtype)
            self.correct += (predicted.reshape(targets.shape) == targets).sum().item()
            self.count += targets.numel()
        else:
            self.correct += (outputs.argmax(dim=-1) == targets).sum().item()
            self.count += targets.numel()

    def compute(self) -> float:
        return self.correct / self.count if self.count else float("nan")


class _MeanError:
    """Mean absolute (power 1) or squared (power 2) error; its root where `root` (torchmetrics'
    MeanSquaredError(squared=False))."""

    def __init__(self, power: int, root: bool = False):
        self.power = power
        self.root = root
        self.total = 0.0
        self.count = 0

    def update(self, outputs, targets) -> None:
        difference = (outputs.reshape(targets.shape).float() - targets.float()).abs()
        self.total += (difference ** self.power).sum().item()
        self.count += targets.numel()

    def compute(self) -> float:
        mean = self.total / self.count if self.count else float("nan")
        return mean ** 0.5 if self.root else mean


BUILT_IN = {"Accuracy": _Accuracy,
            "MeanSquaredError": lambda squared=True, **_ignored: _MeanError(2, root=not squared),
            "MeanAbsoluteError": lambda **_ignored: _MeanError(1)}


class ValidationFunctions:
    def __init__(self, loss_name: str | None, loss_args: dict | None, metric_name: str | None,
                 metric_args: dict | None):
        import torch

        self.loss = None
        self.metric_name = metric_name
        self._metric_args = dict(metric_args or {})
        if loss_name:
            loss_class = getattr(torch.nn, loss_name, None)
            if not (isinstance(loss_class, type) and issubclass(loss_class, torch.nn.Module)):
                raise ConfigError(f"lossFunction {loss_name!r} is not a loss class of torch.nn (e.g. "
                                  f"'CrossEntropyLoss', 'NLLLoss', 'MSELoss')")
            try:
                self.loss = loss_class(**(loss_args or {}))
            except TypeError as exc:
                raise ConfigError(f"lossFunctionArgs do not fit torch.nn.{loss_name}: {exc}") from None
        self._new_metric()  # a wrong name or argument is refused now, not at the first merge

    def _new_metric(self):
        if not self.metric_name:
            return None
        try:
            import torchmetrics
        except ImportError:
            torchmetrics = None
        factory = getattr(torchmetrics, self.metric_name, None) if torchmetrics is not None else None
        if factory is None:
            factory = BUILT_IN.get(self.metric_name)
        if factory is None:
            where = "torchmetrics" if torchmetrics is not None else \
                f"torchmetrics (not installed: pip install torchmetrics; built in: {', '.join(BUILT_IN)})"
            raise ConfigError(f"metricFunction {self.metric_name!r} is not a metric class of {where}")
        try:
            return factory(**self._metric_args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metricFunctionArgs do not fit {self.metric_name}: {exc}") from None

    def measure(self, model, batches) -> dict[str, float]:
        """{metric name: value, "loss": mean loss per sample} of `model` on `batches`."""
        import torch

        metric = self._new_metric()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        if metric is not None and hasattr(metric, "to"):
            metric = metric.to(device)
        loss_sum, samples = 0.0, 0
        try:
            with torch.no_grad():
                for inputs, targets in batches:
                    outputs, targets = model(inputs.to(device)), targets.to(device)
                    samples += len(targets)
                    if self.loss is not None:
                        loss_sum += self._batch_loss(outputs, targets)
                    if metric is not None:
                        metric.update(outputs, targets)
        finally:
            model.train(was_training)
        if not samples:
            raise ConfigError("adsValData holds no samples")
        values: dict[str, float] = {}
        if metric is not None:
            value = metric.compute()
            values[self.metric_name] = float(value.item() if hasattr(value, "item") else value)
        if self.loss is not None:
            values["loss"] = loss_sum / samples
        return values

    def _batch_loss(self, outputs, targets) -> float:
        """The batch's loss summed over its samples, whatever the loss's reduction."""
        value = self.loss(outputs, targets)
        reduction = getattr(self.loss, "reduction", "mean")
        if reduction == "sum":
            return value.item()
        return value.mean().item() * len(targets)
