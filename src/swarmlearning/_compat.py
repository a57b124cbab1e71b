"""What the original's callbacks share: their default logger, their default contract, and turning
their arguments (syncFrequency, minPeers, trainingContract first, then camelCase keywords) into
swarmlearn's."""

from __future__ import annotations

import logging
import sys

from swarmlearn.defaults import DEFAULT_CONTRACT
from swarmlearn.errors import ConfigError

DEFAULT_TRAINING_CONTRACT = DEFAULT_CONTRACT
LOGGER_NAME = "SwarmCallback"


def default_logger() -> logging.Logger:
    """The original's own logger when none is given: "SwarmCallback", INFO, on stdout, so that a
    model.py's `swarmCallback.logger.info(...)` is seen; one handler however many callbacks."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s : %(name)s : %(levelname)s : %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def core_kwargs(syncFrequency, minPeers, trainingContract, kwargs: dict,  # noqa: N803
                platforms: tuple[str, ...]) -> dict:
    """swarmlearn's keyword arguments from the original's; `platforms` are the mlPlatform values
    this callback serves (the first is its default)."""
    kwargs = dict(kwargs)
    platform = kwargs.pop("ml_platform", None) or kwargs.pop("mlPlatform", None) or platforms[0]
    if str(platform).upper() not in platforms:
        raise ConfigError(f"mlPlatform {platform!r} is not served by this callback: it serves "
                          f"{', '.join(platforms)}")
    if trainingContract is None:
        raise ConfigError("trainingContract is None: give a contract name, or leave it out for "
                          f"{DEFAULT_TRAINING_CONTRACT}")
    kwargs.setdefault("logger", None)
    if kwargs["logger"] is None:
        kwargs["logger"] = default_logger()
    return {"sync_frequency": syncFrequency, "min_peers": minPeers, "training_contract": trainingContract,
            **kwargs}
