"""Tasks by name: which model class to load, how to tokenize examples, which metrics to compute.

`TASKS` maps the spec's `task` to a `Task`; a new task is one class plus one entry here, and its name
and metrics in `tunefleet.service.spec.TASK_METRICS`, which each task's `metrics` reads (the Trainer adds
`loss`; tests/test_catalogues.py checks the evaluation functions produce the rest).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from tunefleet.service.spec import SCORER_METRIC, TASK_METRICS, TaskName
from tunefleet.workers.data import Splits, label_vocabulary
from tunefleet.workers.errors import DataError, InvalidConfig
from tunefleet.workers.evaluation import (
    Scorer,
    attribute_metrics,
    classification_metrics,
    entity_metrics,
    exact_match,
    mean_score,
    parse_json_object,
)

__all__ = ["SFT", "TASKS", "CausalLM", "Prepared", "SFTExample", "SequenceClassification", "Task",
           "TokenClassification", "completion_only", "get_task", "greedy_generate"]

IGNORE = -100  # label id the loss and the metrics skip


@dataclass
class Prepared:
    """Tokenized splits (lists of feature dicts) ready for the Trainer, and what evaluation needs."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    label_names: list[str] | None = None
    # causal-lm, sft: per split, (prompt token ids, what the generation is scored against)
    references: dict[str, list[tuple[list[int], Any]]] = field(default_factory=dict)
    max_new_tokens: int = 0
    scorer: Scorer | None = None  # sft: the spec's evaluation.scorer, adding the metric "score"

    def split(self, name: str) -> list[dict[str, Any]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


class Task:
    """What differs between tasks; the training loop is shared (workers/training.py)."""

    name: ClassVar[TaskName]
    auto_class: ClassVar[str]  # transformers Auto* class that loads the base model with this task's head
    peft_task_type: ClassVar[str]  # peft.TaskType value
    uses_labels: ClassVar[bool] = True  # whether the model gets num_labels / id2label

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics an evaluation reports, named as the spec's objectives name them."""
        return TASK_METRICS[self.name]

    def required_fields(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def label_names(self, splits: Splits, data: Mapping[str, Any]) -> list[str] | None:
        """The label vocabulary over all splits, or None for tasks without class labels."""
        return None

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Make a (cached, shared) tokenizer usable for this task; must be idempotent.

        Batches are padded, and decoder tokenizers (Llama, GPT-2 ...) often have no pad token: their eos
        pads instead, as the model's config is told (`run_trial`), which is what transformers' own
        sequence-classification examples do for them.
        """
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token

    def prepare(self, splits: Splits, tokenizer: Any, data: Mapping[str, Any], label_names: list[str] | None,
                max_length: int) -> Prepared:
        raise NotImplementedError

    def compute_metrics(self, label_names: list[str] | None) -> Callable[[Any], dict[str, float]] | None:
        """A Trainer `compute_metrics` over argmax predictions; None when the Trainer only needs the loss."""
        return None

    def generation_metrics(self, model: Any, tokenizer: Any, prepared: Prepared, split: str,
                           batch_size: int) -> dict[str, float]:
        """Metrics that need generation (causal-lm); {} for tasks scored from logits."""
        return {}


def _label_ids(rows: list[dict[str, Any]], field_name: str, mapping: dict[Any, int]) -> list[int]:
    return [mapping[row[field_name]] for row in rows]


class SequenceClassification(Task):
    name = "sequence-classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def required_fields(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        pair = (data["text_pair"],) if data.get("text_pair") else ()
        return (data["text"], *pair, data["label"])

    def label_names(self, splits: Splits, data: Mapping[str, Any]) -> list[str]:
        labels = label_vocabulary(splits, data["label"])
        if len(labels) < 2:
            raise DataError(f"field {data['label']!r} has a single value {labels}; classification needs 2+ labels")
        return labels

    def prepare(self, splits: Splits, tokenizer: Any, data: Mapping[str, Any], label_names: list[str] | None,
                max_length: int) -> Prepared:
        from transformers import DataCollatorWithPadding

        assert label_names is not None
        mapping = {name: i for i, name in enumerate(label_names)}
        out: dict[str, list[dict[str, Any]]] = {}
        for split, rows in splits.items():
            texts = [str(r[data["text"]]) for r in rows]
            pairs = [str(r[data["text_pair"]]) for r in rows] if data.get("text_pair") else None
            # No padding here: the collator pads each batch to its own longest example (FINDINGS: 2.9x faster).
            enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
            labels = _label_ids(rows, data["label"], mapping)
            out[split] = [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(rows))]
        return Prepared(out["train"], out["validation"], out["test"], DataCollatorWithPadding(tokenizer),
                        label_names=[str(n) for n in label_names])

    def compute_metrics(self, label_names: list[str] | None) -> Callable[[Any], dict[str, float]]:
        def compute(pred: Any) -> dict[str, float]:
            return classification_metrics(np.asarray(pred.predictions).ravel(), np.asarray(pred.label_ids).ravel())

        return compute


class TokenClassification(Task):
    """Attribute extraction as BIO tagging over words; the first sub-token of each word carries its tag."""

    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"

    def required_fields(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        return (data["tokens"], data["tags"])

    def label_names(self, splits: Splits, data: Mapping[str, Any]) -> list[str]:
        tags = label_vocabulary(splits, data["tags"], sequence=True)
        bad = [t for t in tags if not isinstance(t, str) or not (t == "O" or t[:2] in ("B-", "I-"))]
        if bad:
            raise DataError(f"field {data['tags']!r} must hold BIO tag strings such as 'B-COLOR', 'I-COLOR', 'O'; "
                            f"found {bad[:5]}. Map tag ids to their names first")
        return tags

    def prepare(self, splits: Splits, tokenizer: Any, data: Mapping[str, Any], label_names: list[str] | None,
                max_length: int) -> Prepared:
        from transformers import DataCollatorForTokenClassification

        assert label_names is not None
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("token-classification needs a fast tokenizer (word_ids); use a model with tokenizer.json")
        mapping = {name: i for i, name in enumerate(label_names)}
        out: dict[str, list[dict[str, Any]]] = {}
        for split, rows in splits.items():
            words = [[str(w) for w in r[data["tokens"]]] for r in rows]
            for i, r in enumerate(rows):
                if len(r[data["tags"]]) != len(words[i]):
                    raise DataError(f"{split} example {i}: {len(words[i])} tokens but {len(r[data['tags']])} tags; "
                                    "give one tag per token")
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            features = []
            for i, r in enumerate(rows):
                labels, previous = [], None
                for word in enc.word_ids(i):
                    labels.append(IGNORE if word is None or word == previous else mapping[r[data["tags"]][word]])
                    previous = word
                features.append({**{k: enc[k][i] for k in enc}, "labels": labels})
            out[split] = features
        return Prepared(out["train"], out["validation"], out["test"],
                        DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE),
                        label_names=list(label_names))

    def compute_metrics(self, label_names: list[str] | None) -> Callable[[Any], dict[str, float]]:
        assert label_names is not None

        def compute(pred: Any) -> dict[str, float]:
            true_seqs, pred_seqs = [], []
            for p_row, l_row in zip(np.asarray(pred.predictions), np.asarray(pred.label_ids), strict=True):
                keep = l_row != IGNORE  # word starts only; truncated words are not scored
                true_seqs.append([label_names[i] for i in l_row[keep]])
                pred_seqs.append([label_names[i] if 0 <= i < len(label_names) else "O" for i in p_row[keep]])
            return entity_metrics(true_seqs, pred_seqs)

        return compute


class _Generative(Task):
    """Tasks of a causal LM that learns an answer after a prompt (loss on the answer only) and is scored on
    what it generates greedily."""

    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    uses_labels = False
    max_new_tokens_cap = 256

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        # Encoder tokenizers (e.g. WordPiece) have no eos: [SEP] ends the answer instead.
        if tokenizer.eos_token is None:
            tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has no eos, sep or pad token to end a generated answer")
        super().prepare_tokenizer(tokenizer)  # eos pads where there is no pad token

    def example(self, row: Mapping[str, Any], data: Mapping[str, Any], tokenizer: Any, max_length: int,
                where: str) -> tuple[list[int], list[int], Any]:
        """One row as (prompt ids, completion ids, the reference its generation is scored against)."""
        raise NotImplementedError

    def prepare(self, splits: Splits, tokenizer: Any, data: Mapping[str, Any], label_names: list[str] | None,
                max_length: int) -> Prepared:
        from transformers import DataCollatorForSeq2Seq

        out: dict[str, list[dict[str, Any]]] = {}
        references: dict[str, list[tuple[list[int], Any]]] = {}
        longest = 0
        for split, rows in splits.items():
            features, refs = [], []
            for i, row in enumerate(rows):
                prompt_ids, completion_ids, reference = self.example(row, data, tokenizer, max_length,
                                                                     f"{split} example {i}")
                features.append(completion_only(prompt_ids, completion_ids))
                refs.append((prompt_ids, reference))
                if split == "train":
                    longest = max(longest, len(completion_ids))
            out[split], references[split] = features, refs
        return Prepared(out["train"], out["validation"], out["test"],
                        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE), references=references,
                        max_new_tokens=min(longest + 8, self.max_new_tokens_cap))


class CausalLM(_Generative):
    """Generative attribute extraction: prompt → JSON object; trained on prompt+target, loss on the target only."""

    name = "causal-lm"

    def required_fields(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        return (data["prompt"], data["target"])

    @staticmethod
    def _target(value: Any, where: str) -> dict[str, Any]:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: target is not JSON ({exc.msg}); give a JSON object of attributes") from exc
        if not isinstance(value, dict):
            raise DataError(f"{where}: target must be a JSON object of attributes, got {type(value).__name__}")
        return value

    def example(self, row: Mapping[str, Any], data: Mapping[str, Any], tokenizer: Any, max_length: int,
                where: str) -> tuple[list[int], list[int], Any]:
        target = self._target(row[data["target"]], where)
        target_ids = tokenizer(json.dumps(target, ensure_ascii=False), add_special_tokens=False)["input_ids"]
        target_ids = target_ids[: max_length // 2] + [tokenizer.eos_token_id]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt_ids = bos + tokenizer(str(row[data["prompt"]]), add_special_tokens=False)["input_ids"]
        # Keep the end of a long prompt: it is nearest to the answer.
        return prompt_ids[-(max_length - len(target_ids)):], target_ids, target

    def generation_metrics(self, model: Any, tokenizer: Any, prepared: Prepared, split: str,
                           batch_size: int) -> dict[str, float]:
        refs = prepared.references[split]
        texts = greedy_generate(model, tokenizer, [p for p, _ in refs], prepared.max_new_tokens, batch_size)
        return attribute_metrics([t for _, t in refs], [parse_json_object(t) for t in texts])


def completion_only(prompt_ids: list[int], completion_ids: list[int]) -> dict[str, list[int]]:
    """A training example of prompt + completion whose labels hide the prompt: the loss is on the completion only."""
    return {"input_ids": prompt_ids + completion_ids, "attention_mask": [1] * (len(prompt_ids) + len(completion_ids)),
            "labels": [IGNORE] * len(prompt_ids) + completion_ids}


def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int) -> list[str]:
    """The greedy continuation of each prompt (token ids), decoded without special tokens; eos ends one."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                width = max(map(len, batch))
                # Left padding, so every prompt ends where generation starts.
                ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
                generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id)
                texts.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


# Without a chat template, chat messages are rendered one per line as "role: content", and the answer
# follows "assistant: " (docs/configuration.md, task sft).
PLAIN_TURN = "{role}: {content}\n"
PLAIN_ANSWER_PROMPT = "assistant: "


@dataclass
class SFTExample:
    """One sft example as text: what the model reads, what it learns to answer, and the answer's plain text."""

    prompt: str
    completion: str
    reference: str  # what a user's scorer compares a generation with: the completion, or the answer's content
    templated: bool  # rendered by a chat template, which writes its own special tokens (bos)


class SFT(_Generative):
    """Instruction tuning on prompt/completion pairs or chat messages; the loss is on the completion only.

    Chat messages (a `messages` list, or `prompt`/`completion` given as message lists) are rendered with the
    tokenizer's chat template by TRL's `apply_chat_template`, which splits prompt and completion where their
    renderings part; plain strings are used as they are, as TRL's SFTTrainer does. A messages example's last
    message is the completion (it must be the assistant's); earlier turns are context. Evaluation generates
    greedily from each prompt: exact_match against the completion, and `score` from the spec's scorer.
    """

    name = "sft"

    def required_fields(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        return ()  # either form may be used, example by example: render() checks each

    def render(self, row: Mapping[str, Any], data: Mapping[str, Any], tokenizer: Any, where: str) -> SFTExample:
        """`row` as prompt and completion text; raises DataError naming the example and the fields it needs."""
        if row.get(data["messages"]) is not None:
            messages = _messages(row[data["messages"]], where, data["messages"])
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: {data['messages']!r} must end with the assistant's answer after at "
                                "least one earlier message (the answer is what the model learns)")
            prompt: Any = messages[:-1]
            completion: Any = messages[-1:]
        elif row.get(data["prompt"]) is not None and row.get(data["completion"]) is not None:
            prompt, completion = row[data["prompt"]], row[data["completion"]]
        else:
            raise DataError(f"{where} has neither {data['messages']!r} (chat messages) nor both {data['prompt']!r} "
                            f"and {data['completion']!r} (it has {sorted(row)}); set data.messages, or data.prompt "
                            "and data.completion, to its field names")
        if isinstance(prompt, str) and isinstance(completion, str):
            return SFTExample(prompt, completion, completion, templated=False)
        if isinstance(prompt, str) or isinstance(completion, str):
            raise DataError(f"{where}: give {data['prompt']!r} and {data['completion']!r} both as strings or both "
                            "as lists of chat messages, not one of each")
        prompt = _messages(prompt, where, data["prompt"])
        completion = _messages(completion, where, data["completion"])
        return self._render_chat(prompt, completion, tokenizer, where)

    @staticmethod
    def _render_chat(prompt: list[dict[str, str]], completion: list[dict[str, str]], tokenizer: Any,
                     where: str) -> SFTExample:
        reference = "\n".join(m["content"] for m in completion)
        if not getattr(tokenizer, "chat_template", None):
            text = "".join(PLAIN_TURN.format(**m) for m in prompt) + PLAIN_ANSWER_PROMPT
            return SFTExample(text, reference, reference, templated=False)
        from trl.data_utils import apply_chat_template

        try:
            rendered = apply_chat_template({"prompt": prompt, "completion": completion}, tokenizer)
        except Exception as exc:  # jinja errors, roles the template refuses
            raise DataError(f"{where}: the tokenizer's chat template cannot render it: {type(exc).__name__}: "
                            f"{exc}") from exc
        return SFTExample(rendered["prompt"], rendered["completion"], reference, templated=True)

    def example(self, row: Mapping[str, Any], data: Mapping[str, Any], tokenizer: Any, max_length: int,
                where: str) -> tuple[list[int], list[int], Any]:
        rendered = self.render(row, data, tokenizer, where)
        prompt_ids, completion_ids = self._tokenize(rendered, tokenizer, max_length, where)
        # Exact match compares with the completion as the tokenizer decodes it, as it decodes a generation.
        decoded = tokenizer.decode(completion_ids, skip_special_tokens=True)
        return prompt_ids, completion_ids, (rendered.reference, decoded)

    @staticmethod
    def _tokenize(example: SFTExample, tokenizer: Any, max_length: int, where: str) -> tuple[list[int], list[int]]:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not example.templated else []
        prompt_ids = bos + tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise DataError(f"{where}: the prompt is empty; generation needs at least one prompt token")
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"][: max_length // 2]
        if tokenizer.eos_token_id not in completion_ids:  # a chat template may end the turn with eos already
            completion_ids.append(tokenizer.eos_token_id)
        # Keep the end of a long prompt: it is nearest to the answer.
        return prompt_ids[-(max_length - len(completion_ids)):], completion_ids

    def generation_metrics(self, model: Any, tokenizer: Any, prepared: Prepared, split: str,
                           batch_size: int) -> dict[str, float]:
        refs = prepared.references[split]
        texts = greedy_generate(model, tokenizer, [p for p, _ in refs], prepared.max_new_tokens, batch_size)
        metrics = {"exact_match": exact_match(texts, [decoded for _, (_, decoded) in refs])}
        if prepared.scorer is not None:
            try:
                metrics[SCORER_METRIC] = mean_score(prepared.scorer, texts, [text for _, (text, _) in refs])
            except ValueError as exc:
                raise InvalidConfig(f"evaluation.scorer: {exc}") from exc
        return metrics


def _messages(value: Any, where: str, field_name: str) -> list[dict[str, str]]:
    """`value` checked as chat messages, [{role, content}, ...] with string values; raises DataError."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in value)):
        raise DataError(f"{where}: {field_name!r} must be a string or a non-empty list of chat messages "
                        '[{"role": ..., "content": ...}] with string roles and contents')
    return [{"role": m["role"], "content": m["content"]} for m in value]


TASKS: dict[str, Task] = {t.name: t for t in (SequenceClassification(), TokenClassification(), CausalLM(), SFT())}


def get_task(name: str) -> Task:
    """The task registered under `name`; raises InvalidConfig for an unknown one."""
    try:
        return TASKS[name]
    except KeyError:
        raise InvalidConfig(f"unknown task {name!r}; use one of {', '.join(TASKS)}") from None
