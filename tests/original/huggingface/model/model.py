############################################################################
# The huggingface example's model.py in the original's shape (our own, much smaller): a BERT-family
# sequence classifier fine-tuned with the Trainer and the original's `swarmlearning.hf_transformers`
# callback, the final model saved with save_pretrained. Where the original downloads bert-base-cased
# and a data set from the hub, this one builds a two-layer BERT from a config in code (the same seed on
# every node) and reads its node's token data from /tmp/test/tokens.npz: nothing is downloaded.
############################################################################

import os

import numpy as np
import torch
from swarmlearning.hf_transformers import SwarmCallback
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

maxEpochs = int(os.getenv('MAX_EPOCHS', '1'))
minPeers = int(os.getenv('MIN_PEERS', '2'))
scratchDir = os.getenv('SCRATCH_DIR', 'scratch')


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, path):
        with np.load(path) as f:
            self.inputIds = torch.tensor(f['input_ids'], dtype=torch.long)
            self.labels = torch.tensor(f['labels'], dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {'input_ids': self.inputIds[i], 'attention_mask': torch.ones_like(self.inputIds[i]),
                'labels': self.labels[i]}


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    train = TokenDataset('tokens.npz')
    args = TrainingArguments(output_dir=os.path.join(scratchDir, 'trainer'), use_cpu=True, report_to='none',
                             save_strategy='no', num_train_epochs=maxEpochs, per_device_train_batch_size=8,
                             learning_rate=1e-3, disable_tqdm=True, dataloader_num_workers=0)
    swarmCallback = SwarmCallback(syncFrequency=4, minPeers=minPeers, model=model, hfMode='full')
    Trainer(model=model, args=args, train_dataset=train, callbacks=[swarmCallback]).train()
    model.save_pretrained(os.path.join(scratchDir, 'final'))
    swarmCallback.logger.info(f'Saved the trained model - {scratchDir}/final')


if __name__ == '__main__':
    main()
