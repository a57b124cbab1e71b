"""A SwarmCallback's settings: our snake_case names and the original product's camelCase ones, cast
the way the original casts them (numbers given as strings, a merge method in any case), and
checked once here, so that an existing model.py runs unchanged and a wrong value is named at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from swarmlearn.errors import ConfigError
from swarmlearn.merge import METHODS

# The original product's keyword names and ours.
CAMEL_CASE = {"syncFrequency": "sync_frequency", "minPeers": "min_peers", "trainingContract": "training_contract",
              "nodeWeightage": "node_weightage", "mergeMethod": "merge_method", "totalEpochs": "total_epochs",
              "useAdaptiveSync": "adaptive_sync", "adsValData": "val_data", "adsValBatchSize": "val_batch_size",
              "checkinModelOnTrainEnd": "checkin_model_on_train_end", "hfMode": "hf_mode",
              "lossFunction": "loss_function", "lossFunctionArgs": "loss_function_args",
              "metricFunction": "metric_function", "metricFunctionArgs": "metric_function_args"}
CHECKIN_MODES = ("snapshot", "inactive", "active")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass
class SwarmSettings:
    sync_frequency: int = 16
    min_peers: int = 2
    training_contract: str = "default"
    node_weightage: float = 1
    # None: the method the contract's creator chose, or that its other members use; mean where none is.
    merge_method: str | None = None
    # Client-level DP of a secure_mean contract: {"clip": L2 bound of a node's update, "noise_multiplier":
    # noise std over the weighted sum's sensitivity, "delta": [1e-5]}; the same on every node.
    client_dp: dict | None = None
    total_epochs: int | None = None
    adapters_only: bool | None = None
    checkin_model_on_train_end: str = "snapshot"
    hf_mode: str | None = None
    logger: logging.Logger | None = None
    # Validation of each merged model: a callable taking the model and returning {name: value} (its
    # first name other than "loss" is the metric), or data the framework's callback measures, with
    # the loss and metric functions it names (the original's lossFunction/metricFunction).
    validate: Callable[[object], dict] | None = None
    val_data: object = None
    val_batch_size: int | None = None
    loss_function: str | None = None
    loss_function_args: dict | None = None
    metric_function: str | None = None
    metric_function_args: dict | None = None
    # The original's useAdaptiveSync: the sync interval follows the merged model's validation loss.
    adaptive_sync: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sync_frequency = whole_number("syncFrequency (sync_frequency)", self.sync_frequency, minimum=1)
        self.min_peers = whole_number("minPeers (min_peers)", self.min_peers, minimum=1)
        if self.total_epochs is not None:
            self.total_epochs = whole_number("totalEpochs (total_epochs)", self.total_epochs, minimum=1)
        if self.val_batch_size is not None:
            self.val_batch_size = whole_number("adsValBatchSize (val_batch_size)", self.val_batch_size, minimum=1)
        self.node_weightage = _weightage(self.node_weightage)
        if not isinstance(self.training_contract, str) or not self.training_contract:
            raise ConfigError(f"trainingContract must be a contract name, got {self.training_contract!r}")
        if self.merge_method is not None:
            self.merge_method = _choice("mergeMethod (merge_method)", self.merge_method, tuple(METHODS))
        if self.client_dp is not None:
            self.client_dp = _client_dp(self.client_dp)
        self.checkin_model_on_train_end = _choice("checkinModelOnTrainEnd", self.checkin_model_on_train_end,
                                                  CHECKIN_MODES)
        self.adaptive_sync = flag("useAdaptiveSync (adaptive_sync)", self.adaptive_sync)
        if self.validate is not None and not callable(self.validate):
            raise ConfigError(f"validate must be a function of the model returning {{name: value}}, got "
                              f"{type(self.validate).__name__}")
        for name in ("loss_function", "metric_function"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must name a class (e.g. 'CrossEntropyLoss', 'Accuracy'), got "
                                  f"{type(getattr(self, name)).__name__}")
        for name in ("loss_function_args", "metric_function_args"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a dict of keyword arguments, got "
                                  f"{type(getattr(self, name)).__name__}")
        if self.logger is not None and not isinstance(self.logger, logging.Logger):
            raise ConfigError(f"logger must be a logging.Logger, got {type(self.logger).__name__}")
        if self.hf_mode is not None and self.adapters_only is None:
            self.adapters_only = self.hf_mode == "peft"


def settings_from(kwargs: dict) -> SwarmSettings:
    """SwarmSettings from a callback's keyword arguments, in either naming."""
    out: dict = {}
    for key, value in kwargs.items():
        name = CAMEL_CASE.get(key, key)
        if name in out:
            raise ConfigError(f"{key} given twice (as {name} too); give one of them")
        out[name] = value
    unknown = sorted(set(out) - set(SwarmSettings.__dataclass_fields__))
    if unknown:
        known = ", ".join(sorted(CAMEL_CASE))
        raise ConfigError(f"SwarmCallback has no argument {unknown[0]!r}; it takes {known} (or their snake_case "
                          f"names), logger, validate, adapters_only")
    return SwarmSettings(**out)


def whole_number(name: str, value, minimum: int) -> int:
    """An int from an int, a whole float or a string of digits ("128"), as the original casts."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value.strip())
    if number is None or number < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return number


def flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return str(value).strip().lower() in TRUE_WORDS
    raise ConfigError(f"{name} must be True or False, got {value!r}")


def _weightage(value) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 < number <= 100:
        raise ConfigError(f"nodeWeightage (node_weightage) must be a number in (0, 100], got {value!r}")
    return number


def _client_dp(value) -> dict:
    """client_dp as the ledger takes it: clip and noise_multiplier > 0, delta in (0, 0.01] (default 1e-5)."""
    example = "client_dp={'clip': 1.0, 'noise_multiplier': 1.0, 'delta': 1e-5}"
    if not isinstance(value, dict) or not {"clip", "noise_multiplier"} <= set(value) \
            or not set(value) <= {"clip", "noise_multiplier", "delta"}:
        raise ConfigError(f"client_dp must be a dict with clip and noise_multiplier (and delta), e.g. {example}; "
                          f"got {value!r}")
    out = {"clip": value["clip"], "noise_multiplier": value["noise_multiplier"], "delta": value.get("delta", 1e-5)}
    for key, top in (("clip", 1e6), ("noise_multiplier", 1e4), ("delta", 0.01)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= top:
            raise ConfigError(f"client_dp {key} must be a number in (0, {top:g}], got {v!r}; e.g. {example}")
        out[key] = float(v)
    return out


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")
    return word
