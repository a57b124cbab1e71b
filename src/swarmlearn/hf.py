"""SwarmCallback for the Hugging Face Trainer:

    trainer = Trainer(model=model, ..., eval_dataset=test, callbacks=[SwarmCallback(sync_frequency=16,
                      min_peers=3, model=model)])

Syncs at train begin (everyone starts from the same state), every `sync_frequency` optimizer steps,
and at the last step, where the swarm's final merged model is loaded into the model the Trainer saves.
After each sync that followed training, the Trainer logs the loss of the steps since the last sync
(recorded as the round's train entry) and, where the Trainer has an `eval_dataset`, evaluates the
merged model just loaded with the user's own `compute_metrics` (recorded as its validation entry).
"""

from __future__ import annotations

from transformers import TrainerCallback

from swarmlearn.callback.core import FINAL_MESSAGE, SwarmCore
from swarmlearn.errors import ConfigError

__all__ = ["FINAL_MESSAGE", "SwarmCallback", "evaluation_values"]

# What Trainer.evaluate reports besides metrics: the epoch and timings (runtime, model_preparation_time,
# samples_per_second, ...), not measurements of the model.
NOT_METRICS = ("epoch",)
TIMINGS = ("runtime", "_time", "_per_second")


class SwarmCallback(TrainerCallback):
    def __init__(self, sync_frequency: int = 16, min_peers: int = 2, model=None, evaluate_merged: bool | None = None,
                 **kwargs):
        """`evaluate_merged`: have the Trainer evaluate each merged model on its eval_dataset. By
        default on when the Trainer evaluates anyway (an eval_strategy, or an evaluate() before train)."""
        self.core = SwarmCore(model, sync_frequency=sync_frequency, min_peers=min_peers, **kwargs)
        self.core.loss_after_sync = True
        self.evaluate_merged = evaluate_merged
        self._logged_step = 0
        self._evaluation_due: int | None = None  # the round whose merged model the Trainer evaluates next

    @property
    def logger(self):
        """The logger this callback writes to (the original's `.logger`): set its level as you like."""
        return self.core.log

    def track_privacy(self, account) -> None:
        """Records the ε this node has spent (at its δ) with each train entry: the PrivacyAccount of
        swarmlearn.dp.make_private (or pass it as `privacy=` when the callback is made)."""
        self.core.track_privacy(account)

    def on_train_begin(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if self.core.model is None:
            self.core.model = model
        if self.evaluate_merged is None:
            self.evaluate_merged = args.eval_strategy != "no" or eval_dataloader is not None
        settings = self.core.settings
        if settings.val_data is not None or settings.loss_function or settings.metric_function:
            self.core.log.info("adsValData/lossFunction/metricFunction are not used with the Trainer: the merged "
                               "models are measured on its eval_dataset with its compute_metrics")
        if settings.adaptive_sync and not self.evaluate_merged:
            raise ConfigError("useAdaptiveSync adapts the sync interval to the merged model's validation loss: give "
                              "the Trainer an eval_dataset and an eval_strategy (or evaluate_merged=True)")
        self._logged_step = state.global_step
        # Made by the Trainer before this call: lora_exact resets its moments of re-factored LoRA factors.
        self.core.optimizer = kwargs.get("optimizer")
        self.core.begin()

    def on_step_end(self, args, state, control, **kwargs):
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        self.core.epoch = state.epoch
        rounds = self.core.rounds
        # The node's final contribution at its last step, not at train end: the Trainer can then
        # still log the last steps' loss and evaluate the swarm's final model.
        self.core.step(samples, last=bool(state.max_steps) and state.global_step >= state.max_steps)
        if self.core.rounds != rounds:
            control.should_log = True
            if self.evaluate_merged:
                control.should_evaluate = True
                self._evaluation_due = self.core.last_round
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            # The Trainer logs the mean loss of the steps since its previous log line.
            self.core.add_loss(logs["loss"], max(1, state.global_step - self._logged_step))
            self._logged_step = state.global_step
            self.core.report_train()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._evaluation_due is None or not metrics:
            return  # the user's own evaluations (before training, between merges) are not the merged model's
        round_no, self._evaluation_due = self._evaluation_due, None
        self.core.report_validation(round_no, evaluation_values(metrics, args.metric_for_best_model))

    def on_train_end(self, args, state, control, **kwargs):
        self.core.end()


def evaluation_values(metrics: dict, preferred: str | None = None) -> dict[str, float]:
    """Trainer.evaluate's metrics as {name: value} without the `eval_` prefix and the timings, the
    metric the user chose (metric_for_best_model) first, else the first the compute_metrics gave."""
    values = {key.removeprefix("eval_"): float(value) for key, value in metrics.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)
              and key.removeprefix("eval_") not in NOT_METRICS and not key.endswith(TIMINGS)}
    first = (preferred or "").removeprefix("eval_")
    if first in values and first != "loss":
        values = {first: values[first], **values}
    return values
