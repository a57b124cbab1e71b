"""The original's Keras callback, `from swarmlearning.tf import SwarmCallback`:

    swarmCallback = SwarmCallback(syncFrequency=128, minPeers=2, useAdaptiveSync=False,
                                  adsValData=(x_test, y_test), adsValBatchSize=128)
    model.fit(x_train, y_train, ..., callbacks=[swarmCallback])

It is a `tf.keras` callback where TensorFlow is installed (as the original's examples import it),
and a Keras 3 callback on any backend otherwise. Every float weight of the model travels (trainable
or not, as the original's get_weights); other variables (seed states, counters) stay local. Each
merged model is measured with `model.evaluate` on adsValData, with the model's compiled loss and
metrics. TensorFlow 1 graph sessions (mlPlatform "TF" with tf=, sess=) are not supported.
"""

from __future__ import annotations

import numpy as np

from swarmlearn.callback.core import SwarmCore
from swarmlearn.errors import ConfigError, SwarmError
from swarmlearning._compat import DEFAULT_TRAINING_CONTRACT, core_kwargs

try:  # the original's examples import tensorflow; without it, Keras 3 (KERAS_BACKEND picks torch, jax, ...)
    from tensorflow import keras
except ImportError:
    import keras

__all__ = ["DEFAULT_TRAINING_CONTRACT", "KerasWeights", "SwarmCallback"]


class KerasWeights:
    """A Keras model's float variables in and out, named by position and path (the same model code
    gives the same names on every node)."""

    def __init__(self, model):
        self.model = model

    def _variables(self) -> dict:
        out = {}
        for index, (variable, value) in enumerate(zip(self.model.weights, self.model.get_weights())):
            if np.asarray(value).dtype.kind == "f":
                name = getattr(variable, "path", None) or variable.name
                out[f"{index:04d}/{name}"] = (variable, np.asarray(value))
        return out

    def blob(self) -> bytes:
        from swarmlearn.tensors import encode, tensor

        return encode({name: tensor(np.ascontiguousarray(value)) for name, (_, value) in self._variables().items()})

    def load(self, blob: bytes) -> None:
        from swarmlearn.tensors import decode

        merged = decode(blob)
        ours = self._variables()
        if set(merged) != set(ours):
            odd = sorted(set(merged) ^ set(ours))[0]
            raise SwarmError(f"merged model and this model differ in variable {odd}: every node must build the "
                             f"same model")
        for name, (variable, value) in ours.items():
            variable.assign(merged[name].array.astype(value.dtype).reshape(value.shape))


class SwarmCallback(keras.callbacks.Callback):
    def __init__(self, syncFrequency, minPeers, trainingContract=DEFAULT_TRAINING_CONTRACT, **kwargs):  # noqa: N803
        super().__init__()
        if kwargs.get("tf") is not None or kwargs.get("sess") is not None:
            raise ConfigError("TensorFlow 1 graph sessions (tf=, sess=) are not supported: train a Keras model "
                              "with model.fit(callbacks=[SwarmCallback(...)])")
        kwargs.pop("tf", None), kwargs.pop("sess", None)
        settings = core_kwargs(syncFrequency, minPeers, trainingContract, kwargs, ("KERAS", "TF"))
        self.core = SwarmCore(None, weights=None, **settings)
        self.core.loss_after_sync = False
        options = self.core.settings
        if options.loss_function or options.metric_function:
            self.core.log.info("lossFunction/metricFunction are the PyTorch callback's: Keras measures each merged "
                               "model with the model's compiled loss and metrics")
        if options.val_data is not None:
            options.validate = _evaluation(options.val_data, options.val_batch_size)
        elif options.adaptive_sync:
            raise ConfigError("useAdaptiveSync adapts the sync interval to the merged model's validation loss: give "
                              "adsValData=(x_val, y_val) and adsValBatchSize")
        self._epoch = 0

    @property
    def logger(self):
        """The logger this callback writes to (the original's `.logger`): set its level as you like."""
        return self.core.log

    def on_train_begin(self, logs=None):
        self.core.model = self.model
        self.core._weights = KerasWeights(self.model)
        self.core.begin()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps")
        self.core.epoch = self._epoch + (batch + 1) / steps if steps else float(self._epoch)
        loss = (logs or {}).get("loss")
        if loss is not None:
            # Keras logs the running mean of the epoch so far: the latest one is what is recorded.
            self.core.train_loss.take()
            self.core.add_loss(float(loss))
        self.core.step(int((logs or {}).get("size", 1)))

    def on_epoch_end(self, epoch, logs=None):
        self.core.epoch = float(epoch + 1)

    def on_train_end(self, logs=None):
        self.core.end()


def _evaluation(val_data, batch_size: int | None):
    """adsValData, as the original takes it: (x, y), (x, y, sample_weight), or a generator or
    dataset of batches, measured by model.evaluate."""
    if isinstance(val_data, tuple):
        if len(val_data) not in (2, 3):
            raise ConfigError(f"adsValData must be (x_val, y_val) or (x_val, y_val, sample_weight), got a tuple of "
                              f"{len(val_data)}")
        x, y, weights = (*val_data, None)[:3]

        def validate(model) -> dict:
            return model.evaluate(x, y, sample_weight=weights, batch_size=batch_size, verbose=0, return_dict=True)
    else:
        def validate(model) -> dict:
            return model.evaluate(val_data, verbose=0, return_dict=True)
    return validate
