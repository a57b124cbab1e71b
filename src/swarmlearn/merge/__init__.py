"""Merge methods: one file each behind one small interface (`merge/base.py`), listed once, here.

`METHODS` is the one list of merge methods: the ML callback's `merge_method` (MERGE_METHOD), the
CLI's `--merge-method` choices and the leader's lookup all read it. It maps a method's name to the
class in `merge/<name>.py` that implements it, by name, so that reading the list loads no numpy (the
CLI offers it at start-up); `get_merger` imports the one method a leader needs. To add a method:
write `merge/<name>.py` with a `Merger` subclass whose `name` is the method's name, add it below,
and test it in `tests/test_merge.py` (every method) and a `tests/test_merge_<name>.py` of its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from swarmlearn.errors import SwarmError

if TYPE_CHECKING:
    from swarmlearn.merge.base import Merger

METHODS: dict[str, str] = {"mean": "Mean", "coordmedian": "CoordMedian", "geomedian": "GeoMedian",
                           "trimmedmean": "TrimmedMean", "multikrum": "MultiKrum",
                           "secure_mean": "SecureMean", "lora_exact": "LoraExact", "ffa_lora": "FfaLora"}

# The method whose rounds hide each participant's update from the leader (sl/secure.py), and the fewest
# participants such a round may have: with two, each would learn the other's update from the sum.
SECURE_MEAN = "secure_mean"
SECURE_MIN_PEERS = 3


def needs_each_update(name: str) -> bool:
    """Whether method `name` reads each contribution in the clear (medians, Krum), so that it cannot be
    combined with secure_mean."""
    return get_merger(name).needs_individual_updates


def get_merger(name: str, contract_seed: bytes | None = None) -> Merger:
    """The merger of method `name`, given the contract's seed (swarmlearn.lora.contract_seed) for the
    methods that check contributions against it (`ffa_lora`)."""
    if name not in METHODS:
        raise SwarmError(f"unknown merge method {name!r}; one of {', '.join(METHODS)}")
    merger = getattr(importlib.import_module(f"swarmlearn.merge.{name}"), METHODS[name])()
    merger.contract_seed = contract_seed
    return merger
