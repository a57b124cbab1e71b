"""`swarmlearning.hf`: the same Hugging Face Trainer callback as `swarmlearning.hf_transformers`."""

from swarmlearning.hf_transformers import DEFAULT_TRAINING_CONTRACT, SwarmCallback

__all__ = ["DEFAULT_TRAINING_CONTRACT", "SwarmCallback"]
