"""Fixtures for the worker's torch side: tiny models built from configs and small learnable data sets.

The models are random-initialised 2-layer BERT / Llama configs saved with the MiniLM tokenizer from
the demo package, so tests are offline and take seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tunefleet.demo.data import demo_model_path  # noqa: E402
from tunefleet.workers.model_cache import ModelCache  # noqa: E402

FILLER = ("the", "a", "shop", "item", "this", "with", "for", "new", "sale", "today", "nice", "box", "of", "and")
COLORS = ("red", "blue", "green", "black")
SIZES = ("small", "large")


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 64) with the MiniLM tokenizer, saved to a folder."""
    from transformers import BertConfig, BertModel

    tokenizer = _tokenizer()
    path = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(0)  # the same tiny model every run
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64) with the MiniLM tokenizer ([SEP] ends answers), saved to a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A chat template as instruct models ship one: each turn "role : content [SEP]" ([SEP] is this tokenizer's eos).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama with a chat template in its tokenizer (CHAT_TEMPLATE)."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    tokenizer = _tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sentence(rng: random.Random, *keywords: str) -> list[str]:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
    for k in keywords:
        words.insert(rng.randint(0, len(words)), k)
    return words


def classification_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Label 'good' when the text contains 'excellent', 'bad' when it contains 'poor'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "good" if i % 2 else "bad"
        rows.append({"text": " ".join(_sentence(rng, "excellent" if label == "good" else "poor")), "label": label})
    return rows


def tagging_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Words with colours tagged B-COLOR and sizes tagged B-SIZE ('dark' + colour gives B-COLOR I-COLOR)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = _sentence(rng)
        tags = ["O"] * len(words)
        pos = rng.randint(0, len(words))
        color = ["dark", rng.choice(COLORS)] if rng.random() < 0.3 else [rng.choice(COLORS)]
        words[pos:pos] = color
        tags[pos:pos] = ["B-COLOR"] + ["I-COLOR"] * (len(color) - 1)
        if rng.random() < 0.5:
            pos = rng.randint(0, len(words))
            words.insert(pos, rng.choice(SIZES))
            tags.insert(pos, "B-SIZE")
        rows.append({"tokens": words, "tags": tags})
    return rows


def extraction_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Prompt 'extract: ... red ... large ...' → {"color": "red", "size": "large"}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, size = rng.choice(COLORS), rng.choice(SIZES)
        prompt = "extract : " + " ".join(_sentence(rng, color, size)) + " ->"
        rows.append({"prompt": prompt, "target": {"color": color, "size": size}})
    return rows


def instruction_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Prompt 'colour : ... red ... ->' → completion 'red' (lower case, as the WordPiece tokenizer decodes)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color = rng.choice(COLORS)
        rows.append({"prompt": "colour : " + " ".join(_sentence(rng, color)) + " ->", "completion": color})
    return rows


def chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """instruction_rows as chat messages: a system turn, the question, the assistant's answer."""
    return [{"messages": [{"role": "system", "content": "name the colour"}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}]} for r in instruction_rows(n, seed)]


ROWS: dict[str, Callable[[int, int], list[dict[str, Any]]]] = {
    "sequence-classification": classification_rows,
    "token-classification": tagging_rows,
    "causal-lm": extraction_rows,
    "sft": instruction_rows,
}
OBJECTIVE = {"sequence-classification": "accuracy", "token-classification": "entity_f1", "causal-lm": "attribute_f1",
             "sft": "exact_match"}
GENERATIVE = ("causal-lm", "sft")  # tasks of the tiny causal LM


@pytest.fixture
def make_spec(tmp_path: Path, tiny_bert: Path, tiny_llama: Path) -> Callable[..., dict[str, Any]]:
    """make_spec(task, sizes=(train, validation, test), fixed=..., data=...) → a spec dict with data files.

    A size of 0 leaves that split out (the worker carves it).
    """

    def make(task: str = "sequence-classification", *, sizes: tuple[int, int, int] = (160, 48, 48),
             fixed: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
             objective: Any = None) -> dict[str, Any]:
        files = {}
        for i, (split, n) in enumerate(zip(("train", "validation", "test"), sizes, strict=True)):
            if n:
                files[split] = str(write_jsonl(tmp_path / f"{task}-{split}.jsonl", ROWS[task](n, seed=i)))
        return {
            "name": "unit",
            "model": str(tiny_llama if task in GENERATIVE else tiny_bert),
            "task": task,
            "data": {**files, **(data or {})},
            "objective": objective or {"metric": OBJECTIVE[task], "direction": "maximize"},
            "search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "fixed": {"per_device_batch_size": 16, "max_seq_length": 48, "eval_batch_size": 64,
                      "learning_rate": 3e-3, "method": "full", **(fixed or {})},
            "seed": 0,
        }

    return make


@pytest.fixture
def cache() -> ModelCache:
    return ModelCache()
