"""Merge methods: one file each behind one small interface (`merge/base.py`), listed once, here.

`METHODS` is the one list of merge methods: the ML callback's `merge_method` (MERGE_METHOD), the
CLI's `--merge-method` choices and the leader's lookup all read it. To add a method: write
`merge/<name>.py` with a `Merger` subclass whose `name` is the method's name, test it in
`tests/test_merge_<name>.py`, and add it to `METHODS` below.
"""

from __future__ import annotations

from swarmlearn.errors import SwarmError
from swarmlearn.merge.base import (NORM_OUTLIER_FACTOR, BadContribution, Contribution, Merger, MergeError,
                                   check_contribution, contribution_norm, norm_outliers)
from swarmlearn.merge.coordmedian import CoordMedian
from swarmlearn.merge.geomedian import GeoMedian
from swarmlearn.merge.mean import Mean

METHODS: dict[str, type[Merger]] = {m.name: m for m in (Mean, CoordMedian, GeoMedian)}


def get_merger(name: str) -> Merger:
    if name not in METHODS:
        raise SwarmError(f"unknown merge method {name!r}; one of {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "NORM_OUTLIER_FACTOR", "BadContribution", "Contribution", "MergeError", "Merger",
           "check_contribution", "contribution_norm", "get_merger", "norm_outliers"]
