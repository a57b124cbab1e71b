"""The original's Hugging Face Trainer callback, `from swarmlearning.hf_transformers import
SwarmCallback` (also `swarmlearning.hf`):

    trainer = Trainer(..., callbacks=[SwarmCallback(syncFrequency=16, minPeers=2, model=model, hfMode="peft")])

`hfMode` "peft" moves the adapters (and `modules_to_save` head) only, "full" the whole state dict;
left out, a PeftModel moves its adapters and any other model everything. Each merged model is
measured by the Trainer on its eval_dataset (adsValData is not used here, as in the original).
"""

from __future__ import annotations

from swarmlearn import hf as _hf
from swarmlearn.errors import ConfigError
from swarmlearning._compat import DEFAULT_TRAINING_CONTRACT, core_kwargs

__all__ = ["DEFAULT_TRAINING_CONTRACT", "SwarmCallback"]


class SwarmCallback(_hf.SwarmCallback):
    def __init__(self, syncFrequency, minPeers, trainingContract=DEFAULT_TRAINING_CONTRACT, **kwargs):  # noqa: N803
        model = kwargs.pop("model", None)
        mode = kwargs.get("hfMode", kwargs.get("hf_mode"))
        if mode is not None and mode not in ("full", "peft"):
            raise ConfigError(f"hfMode {mode!r} is not one of full, peft")
        super().__init__(model=model, **core_kwargs(syncFrequency, minPeers, trainingContract, kwargs,
                                                    ("HF_TRANSFORMER", "HF_TRANSFORMERS", "PYTORCH")))
