"""Metrics, computed from plain predictions (no torch): classification, BIO entities, JSON attributes, and
generated text (exact match, a user's scorer).

Names match `tunefleet.service.spec.TASK_METRICS`; `loss` (evaluation loss) comes from the Trainer.
Entity-level F1 follows the CoNLL convention (as seqeval does in its default mode): an entity counts
only when its type and both boundaries are right.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "attribute_metrics",
    "bio_entities",
    "classification_metrics",
    "entity_metrics",
    "exact_match",
    "load_scorer",
    "mean_score",
    "normalize_attributes",
    "parse_json_object",
    "prf",
]


def prf(true_positives: int, n_predicted: int, n_true: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts; 0 where undefined (nothing predicted / nothing to find)."""
    precision = true_positives / n_predicted if n_predicted else 0.0
    recall = true_positives / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def classification_metrics(predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """accuracy and macro precision / recall / F1 over the classes seen in labels or predictions."""
    pred, true = np.asarray(predictions), np.asarray(labels)
    per_class = [prf(int(((pred == c) & (true == c)).sum()), int((pred == c).sum()), int((true == c).sum()))
                 for c in np.union1d(pred, true)]
    p, r, f = (float(np.mean(col)) if per_class else 0.0 for col in zip(*per_class, strict=True))
    return {"accuracy": float((pred == true).mean()) if len(true) else 0.0,
            "precision_macro": p, "recall_macro": r, "f1_macro": f}


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities (type, start, end-exclusive) in a BIO/IOB2 tag sequence.

    An `I-X` that does not continue an entity of type X starts a new one (lenient, as conlleval does).
    """
    entities: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            entities.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return entities


def entity_metrics(true_tags: Iterable[Sequence[str]], pred_tags: Iterable[Sequence[str]]) -> dict[str, float]:
    """entity_precision / entity_recall / entity_f1 (micro over all entities) and token_accuracy."""
    tp = n_pred = n_true = correct = total = 0
    for true, pred in zip(true_tags, pred_tags, strict=True):
        t, p = bio_entities(true), bio_entities(pred)
        tp, n_pred, n_true = tp + len(t & p), n_pred + len(p), n_true + len(t)
        correct += sum(a == b for a, b in zip(true, pred, strict=True))
        total += len(true)
    precision, recall, f1 = prf(tp, n_pred, n_true)
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "token_accuracy": correct / total if total else 0.0}


_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in generated text, or None when there is none (counts as a wrong answer)."""
    match = _OBJECT.search(text)
    if not match:
        return None
    candidate = match.group(0)
    # Generation may run past the object; shrink from the right until it parses.
    while candidate:
        try:
            obj = json.loads(candidate)
            return obj if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            end = candidate.rfind("}", 0, len(candidate) - 1)
            if end < 0:
                return None
            candidate = candidate[: end + 1]
    return None


def _norm(value: Any) -> str:
    # Tokenizers that lower-case or split punctuation (WordPiece) decode "Red" as " red "; compare on
    # lower-cased, whitespace-collapsed strings so a correct answer is not lost to detokenization.
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return " ".join(text.lower().split())


def normalize_attributes(obj: dict[str, Any] | None) -> set[tuple[str, str]]:
    """(key, value) pairs of an attribute object, normalized; a list value gives one pair per item."""
    pairs: set[tuple[str, str]] = set()
    for key, value in (obj or {}).items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item != "":
                pairs.add((_norm(key), _norm(item)))
    return pairs


def attribute_metrics(targets: Iterable[dict[str, Any]], predictions: Iterable[dict[str, Any] | None]
                      ) -> dict[str, float]:
    """exact_match (all pairs right, nothing extra) and micro attribute precision / recall / F1."""
    tp = n_pred = n_true = exact = count = 0
    for target, predicted in zip(targets, predictions, strict=True):
        t, p = normalize_attributes(target), normalize_attributes(predicted)
        tp, n_pred, n_true = tp + len(t & p), n_pred + len(p), n_true + len(t)
        exact += int(predicted is not None and t == p)
        count += 1
    precision, recall, f1 = prf(tp, n_pred, n_true)
    return {"exact_match": exact / count if count else 0.0, "attribute_f1": f1,
            "attribute_precision": precision, "attribute_recall": recall}


def _squash(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of generations equal to their reference, after collapsing whitespace (case is kept)."""
    pairs = list(zip(predictions, references, strict=True))
    return sum(_squash(p) == _squash(r) for p, r in pairs) / len(pairs) if pairs else 0.0


Scorer = Callable[[str, str], float]


def load_scorer(ref: str) -> Scorer:
    """The function `module:function` names, imported on the worker; raises ValueError saying what is missing."""
    import importlib

    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import the scorer's module {module_name!r} ({exc}); install it on every worker "
                         "or start the worker where it is importable (PYTHONPATH)") from exc
    scorer = getattr(module, attr, None)
    if not callable(scorer):
        raise ValueError(f"module {module_name!r} has no function {attr!r}; name it as module:function")
    return scorer


def mean_score(scorer: Scorer, predictions: Sequence[str], references: Sequence[str]) -> float:
    """The mean of `scorer(prediction, reference)` (a bool counts 0 or 1); raises ValueError when it returns
    anything but a finite number."""
    values = []
    for prediction, reference in zip(predictions, references, strict=True):
        try:
            value = scorer(prediction, reference)
        except Exception as exc:  # the user's code: any error ends the trial with its message
            raise ValueError(f"the scorer raised {type(exc).__name__}: {exc} (prediction {prediction!r}, "
                             f"reference {reference!r})") from exc
        if not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"the scorer returned {value!r} for {prediction!r}; it must return a finite number")
        values.append(float(value))
    return float(np.mean(values)) if values else 0.0
