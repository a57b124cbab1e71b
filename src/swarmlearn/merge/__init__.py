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

METHODS: dict[str, str] = {"mean": "Mean", "coordmedian": "CoordMedian", "geomedian": "GeoMedian"}


def get_merger(name: str) -> Merger:
    if name not in METHODS:
        raise SwarmError(f"unknown merge method {name!r}; one of {', '.join(METHODS)}")
    return getattr(importlib.import_module(f"swarmlearn.merge.{name}"), METHODS[name])()
