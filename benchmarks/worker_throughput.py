"""Worker overhead: the same fine-tuning through run_trial vs a plain HF Trainer script; model cache load times.

Trains all-MiniLM-L6-v2 with LoRA r=8 (query, value), lr 5e-4, batch 16, 128 tokens, 1 epoch on the
first N BBC News training articles (demo data), twice:
  (a) through `tunefleet.workers.training.run_trial` with a no-op report (rungs 20/60/100: their evaluations are
      timed and excluded from its throughput, as `extra["samples_per_second"]` does);
  (b) through a plain `Trainer` written out below, with no evaluation.
Then loads the base model through a fresh `ModelCache` three times (first from disk, then cached).
With --demo it also times whole demo trials (tunefleet.demo.data.demo_spec, rungs 20/60/100, no pruning).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/worker_throughput.py --train-size 480 --demo
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from tunefleet.demo.data import demo_model_path, demo_spec, write_bbc_news  # noqa: E402
from tunefleet.workers.data import read_records  # noqa: E402
from tunefleet.workers.model_cache import ModelCache  # noqa: E402
from tunefleet.workers.tasks import TASKS  # noqa: E402
from tunefleet.workers.training import run_trial  # noqa: E402

CONFIG = {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "learning_rate": 5e-4,
          "per_device_batch_size": 16, "max_seq_length": 128, "num_epochs": 1, "eval_batch_size": 64, "seed": 0,
          "optimizer": "adamw_torch"}


def via_run_trial(data_dir: Path, train_size: int, workdir: Path) -> dict[str, float]:
    spec = {"name": "bench", "model": str(demo_model_path()), "task": "sequence-classification",
            "data": {**{f: str(data_dir / f"{f}.jsonl") for f in ("train", "validation", "test")},
                     "max_eval_samples": 100},
            "objective": {"metric": "accuracy"}, "fixed": {**CONFIG, "train_size": train_size}, "seed": 0}
    out = run_trial(spec, {}, [20, 60, 100], lambda *_: "continue", workdir=workdir, model_cache=ModelCache())
    return {"samples_per_s": out.extra["samples_per_second"], "train_s": out.extra["train_seconds"],
            "eval_s": out.extra["eval_seconds"], "accuracy": out.validation_metrics["accuracy"]}


def via_plain_trainer(data_dir: Path, train_size: int, workdir: Path) -> dict[str, float]:
    """What a user would write by hand: same model, data, LoRA, arguments; no evaluation."""
    from peft import LoraConfig, get_peft_model

    rows = read_records(data_dir / "train.jsonl")
    labels = sorted({r["label"] for r in rows})
    # Same subset as run_trial's train_size (seeded by data.split_seed=0).
    import numpy as np

    rows = [rows[i] for i in sorted(np.random.default_rng(0).permutation(len(rows))[:train_size].tolist())]
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=CONFIG["max_seq_length"])
    dataset = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                "token_type_ids": enc["token_type_ids"][i], "labels": labels.index(r["label"])}
               for i, r in enumerate(rows)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(demo_model_path(), num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1))
    args = TrainingArguments(output_dir=str(workdir), per_device_train_batch_size=16, learning_rate=5e-4,
                             num_train_epochs=1, optim="adamw_torch", save_strategy="no", report_to="none",
                             disable_tqdm=True, logging_steps=1, use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer)
    metrics = trainer.train().metrics
    return {"samples_per_s": metrics["train_samples_per_second"], "train_s": metrics["train_runtime"],
            "eval_s": 0.0, "accuracy": float("nan")}


DEMO_PARAMS = [  # the baseline, then a tuned LoRA and a full fine-tuning configuration
    {"method": "lora", "learning_rate": 5e-5, "lora_r": 8, "weight_decay": 0.0, "warmup_ratio": 0.0},
    {"method": "lora", "learning_rate": 2e-3, "lora_r": 8, "weight_decay": 0.0, "warmup_ratio": 0.1},
    {"method": "full", "learning_rate": 1e-4, "lora_r": 8, "weight_decay": 0.0, "warmup_ratio": 0.1},
]


def _recorder(values: list[float]):  # noqa: ANN202
    def report(pct: int, value: float, metrics: dict[str, float]) -> bool:
        values.append(value)
        return False

    return report


def demo_trials(data_dir: Path, workdir: Path) -> list[tuple[dict, float, list[float], float]]:
    """(params, wall seconds, accuracy at each rung, test accuracy) for each of DEMO_PARAMS."""
    spec = demo_spec(data_dir)
    cache = ModelCache()
    results = []
    for i, params in enumerate(DEMO_PARAMS):
        rung_values: list[float] = []
        start = time.perf_counter()
        out = run_trial(spec, params, [20, 60, 100], _recorder(rung_values), workdir=workdir / f"demo{i}",
                        model_cache=cache)
        results.append((params, time.perf_counter() - start, rung_values, out.test_metrics["accuracy"]))
    return results


def load_times() -> list[tuple[float, bool]]:
    cache = ModelCache()
    task = TASKS["sequence-classification"]
    labels = ["business", "entertainment", "politics", "sports", "tech"]
    out = []
    for _ in range(3):
        loaded = cache.model(str(demo_model_path()), task, labels, seed=0)
        out.append((loaded.load_seconds, loaded.cached))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=1, help="alternate (a) and (b) this many times; medians")
    parser.add_argument("--demo", action="store_true", help="also time whole demo trials")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        write_bbc_news(data_dir)
        runs: dict[str, list[dict[str, float]]] = {"run_trial": [], "plain Trainer": []}
        for i in range(args.repeats):
            # Alternate so drift on a shared machine hits both alike.
            runs["run_trial"].append(via_run_trial(data_dir, args.train_size, Path(tmp) / f"a{i}"))
            runs["plain Trainer"].append(via_plain_trainer(data_dir, args.train_size, Path(tmp) / f"b{i}"))
        loads = load_times()
        demo = demo_trials(data_dir, Path(tmp)) if args.demo else []

    print(f"\nLoRA r=8, {args.train_size} BBC News articles, seq 128, batch 16, 1 epoch, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; medians of {args.repeats}")
    print("| path | training samples/s | train wall s | of which rung evals s |\n|---|---|---|---|")
    medians = {}
    for name, results in runs.items():
        medians[name] = {k: statistics.median(r[k] for r in results) for k in results[0]}
        m = medians[name]
        print(f"| {name} | {m['samples_per_s']:.2f} | {m['train_s']:.1f} | {m['eval_s']:.1f} |")
    ratio = medians["run_trial"]["samples_per_s"] / medians["plain Trainer"]["samples_per_s"]
    print(f"\nratio run_trial / plain Trainer: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    print("\n| base model load | seconds | from cache |\n|---|---|---|")
    for i, (seconds, cached) in enumerate(loads, 1):
        print(f"| trial {i} | {seconds:.3f} | {'yes' if cached else 'no'} |")
    if demo:
        print("\n| demo trial | seconds | val accuracy at 20/60/100% | test accuracy |\n|---|---|---|---|")
        for params, seconds, values, test in demo:
            label = f"{params['method']} lr {params['learning_rate']:g}"
            print(f"| {label} | {seconds:.0f} | {' / '.join(f'{v:.3f}' for v in values)} | {test:.3f} |")


if __name__ == "__main__":
    main()
