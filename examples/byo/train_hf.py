"""A Hugging Face `Trainer` script tuned by tunefleet: two added lines (marked) report each evaluation and
stop training when the trial is pruned. A tiny BERT built from a config learns whether token 3 occurs in a
random sequence, so it runs anywhere in seconds, with no download.

    tunefleet study create examples/byo/hf.yaml
    tunefleet agent --server http://127.0.0.1:8000 -- python examples/byo/train_hf.py
"""

import tempfile

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from tunefleet import sdk
from tunefleet.sdk.hf import TunefleetCallback  # added line 1 of 2

params = {"learning_rate": 5e-3, "batch_size": 16, "max_steps": 30, **sdk.params()}


def synthetic(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 20, (n, 12), generator=generator)
    ids[: n // 2, 5] = 3  # half the sequences hold token 3
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": torch.tensor(int((row == 3).any()))}
            for row in ids[torch.randperm(n, generator=generator)]]


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


torch.manual_seed(0)
config = BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=16, num_labels=2)
args = TrainingArguments(output_dir=tempfile.mkdtemp(), learning_rate=float(params["learning_rate"]),
                         per_device_train_batch_size=int(params["batch_size"]), max_steps=int(params["max_steps"]),
                         eval_strategy="steps", eval_steps=max(int(params["max_steps"]) // 5, 1), save_strategy="no",
                         per_device_eval_batch_size=64, report_to=[], use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=synthetic(512, 0),
                  eval_dataset=synthetic(64, 1), compute_metrics=accuracy,
                  callbacks=[TunefleetCallback()])  # added line 2 of 2
trainer.train(resume_from_checkpoint=sdk.resume_dir())  # optional: paused trials resume from their checkpoint
