"""A user's Hugging Face model.py, as the tests run it on each node: LoRA fine-tuning of a tiny BERT
classifier (built from a config in code, nothing downloaded) with the Trainer, on this node's own
synthetic token data. Only the adapters and the classifier head are trainable, so only they travel.

Every node builds the base model from the same seed, so the frozen base weights match everywhere;
the data differ per node. At the end the swarm's final adapters are saved with `save_pretrained`
(OUT_DIR/NODE_ID/final) and, as PEFT's state dict, to OUT_DIR/NODE_ID/final-adapters.safetensors.

Environment: NODE_ID, SWARM_SL_ADDR, OUT_DIR, and optionally SEED, STEPS, SYNC_FREQUENCY, MIN_PEERS, BATCH,
MERGE_METHOD.
"""

import os
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from swarmlearn.hf import SwarmCallback

VOCAB, SEQ_LEN = 64, 16


def build_base(seed: int = 0) -> BertForSequenceClassification:
    """The tiny BERT classifier; the same seed gives the same weights on every node."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def build_model(seed: int = 0):
    """The base with LoRA on query/value; PEFT makes the classifier head trainable (modules_to_save)."""
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, bias="none", task_type=TaskType.SEQ_CLS,
                      target_modules=["query", "value"])
    return get_peft_model(build_base(seed), lora)


class TokenData(torch.utils.data.Dataset):
    """Random token sequences; the label says whether low-numbered tokens are the majority. Each node
    draws from its own generator and its own token range, so the nodes' data differ."""

    def __init__(self, node_seed: int, n: int = 128):
        g = torch.Generator().manual_seed(node_seed)
        low = 1 + node_seed % 8
        self.input_ids = torch.randint(low, VOCAB, (n, SEQ_LEN), generator=g)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.labels = ((self.input_ids < VOCAB // 2).sum(dim=1) > SEQ_LEN // 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def main() -> None:
    torch.set_num_threads(1)
    node = os.environ["NODE_ID"]
    out = Path(os.environ["OUT_DIR"]) / node
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(int(os.environ.get("SEED", "0")))
    data = TokenData(sum(map(ord, node)))
    args = TrainingArguments(output_dir=str(out / "trainer"), use_cpu=True, report_to="none", save_strategy="no",
                             max_steps=int(os.environ.get("STEPS", "12")), logging_steps=2, learning_rate=1e-3,
                             per_device_train_batch_size=int(os.environ.get("BATCH", "8")), disable_tqdm=True,
                             dataloader_num_workers=0)
    swarm = SwarmCallback(sync_frequency=int(os.environ.get("SYNC_FREQUENCY", "4")),
                          min_peers=int(os.environ.get("MIN_PEERS", "3")), model=model,
                          merge_method=os.environ.get("MERGE_METHOD") or None)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[swarm]).train()
    model.save_pretrained(str(out / "final"))
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(out / "final-adapters.safetensors"))
    print(f"{node}: done after {swarm.core.rounds} syncs, {swarm.core.bytes_sent} bytes sent", flush=True)


if __name__ == "__main__":
    main()
