"""SwarmCallback for the Hugging Face Trainer:

    trainer = Trainer(model=model, ..., callbacks=[SwarmCallback(sync_frequency=16, min_peers=3, model=model)])

Syncs at train begin (everyone starts from the same state), every `sync_frequency` optimizer steps,
and at train end, where the swarm's final merged model is loaded into the model the Trainer saves.
"""

from __future__ import annotations

from transformers import TrainerCallback

from swarmlearn.callback.core import FINAL_MESSAGE, SwarmCore

__all__ = ["FINAL_MESSAGE", "SwarmCallback"]


class SwarmCallback(TrainerCallback):
    def __init__(self, sync_frequency: int = 16, min_peers: int = 2, model=None, **kwargs):
        self.core = SwarmCore(model, sync_frequency=sync_frequency, min_peers=min_peers, **kwargs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.core.model is None:
            self.core.model = model
        self.core.begin()

    def on_step_end(self, args, state, control, **kwargs):
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        self.core.report(epoch=state.epoch)
        self.core.step(samples)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.core.report(loss=logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics:
            for key in ("eval_accuracy", "eval_f1", "eval_metric"):
                if key in metrics:
                    self.core.report(metric=metrics[key])
                    break
            if "eval_loss" in metrics:
                self.core.report(eval_loss=metrics["eval_loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.core.end()
