"""Read a study's examples into train / validation / test splits, and say how the splits were made.

Local files are read by extension (`.jsonl`/`.json`, `.csv`, `.parquet`) into memory, without the
`datasets` cache, so a worker leaves nothing behind; a hub id goes through `datasets.load_dataset`.
Missing validation or test splits are carved from the training split with `data.split_seed`, so every
trial of a study (and every worker) sees the same examples. The test split is only ever evaluated
once, after training: it is never used to prune or select.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunefleet.workers.errors import DataError

__all__ = ["SPLITS", "Splits", "label_vocabulary", "load_splits", "read_records"]

SPLITS = ("train", "validation", "test")
Record = dict[str, Any]


@dataclass
class Splits:
    """Raw examples per split plus `record`: where they came from and how they were cut (JSON-able)."""

    train: list[Record]
    validation: list[Record]
    test: list[Record]
    record: dict[str, Any] = field(default_factory=dict)

    def items(self) -> list[tuple[str, list[Record]]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


def read_records(path: str | Path) -> list[Record]:
    """Read a local jsonl / json / csv / parquet file into a list of dicts; raises DataError naming the problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path in the spec's data section "
                        "(relative paths are resolved from the worker's working directory)")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"data file {path} has an unsupported extension {path.suffix!r}; "
                        f"use one of {', '.join(sorted(_READERS))}")
    try:
        records = reader(path)
    except DataError:
        raise
    except Exception as exc:  # pandas / pyarrow raise many types; the user needs the path and the cause
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not records:
        raise DataError(f"data file {path} holds no examples")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); "
                                "write one JSON object per line") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno} is a {type(obj).__name__}, not a JSON object")
            records.append(obj)
    return records


def _read_json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # many ".json" files are really JSON lines
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise DataError(f"{path} must be a JSON list of objects (or JSON lines)")
    return obj


def _read_csv(path: Path) -> list[Record]:
    import pandas as pd

    return pd.read_csv(path).to_dict(orient="records")


def _read_parquet(path: Path) -> list[Record]:
    import pandas as pd

    return pd.read_parquet(path).to_dict(orient="records")


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def load_splits(data: Mapping[str, Any], *, required: tuple[str, ...], train_size: int | None = None) -> Splits:
    """Load the three splits described by a spec's `data` section (DataSpec.model_dump() shape).

    `required` lists the fields each example must have (e.g. the text and label columns). Missing
    validation/test splits are carved from train with `split_seed` and the spec's fractions; then
    `max_train_samples` / `max_eval_samples` cap the splits and `train_size` subsamples train (seeded
    by `split_seed`, so trials with the same train_size train on the same examples).
    Raises DataError for unreadable sources, missing fields, or splits left empty.
    """
    source, train, given = _load_source(data)
    seed = int(data.get("split_seed", 0))
    rng = np.random.default_rng(seed)
    carved = []
    held: dict[str, list[Record]] = {}
    for split, fraction_key in (("test", "test_fraction"), ("validation", "validation_fraction")):
        rows = given.get(split)
        if rows is None:
            fraction = float(data.get(fraction_key, 0.15))
            train, rows = _carve(train, fraction, rng, split)
            carved.append(split)
        held[split] = rows
    validation, test = held["validation"], held["test"]
    if data.get("max_train_samples"):
        train = _subsample(train, int(data["max_train_samples"]), rng)
    if data.get("max_eval_samples"):
        validation = validation[: int(data["max_eval_samples"])]
        test = test[: int(data["max_eval_samples"])]
    available = len(train)
    if train_size is not None:
        if train_size > available:
            raise DataError(f"train_size={train_size} but only {available} training examples are available; "
                            "lower train_size or its search range")
        train = _subsample(train, train_size, np.random.default_rng(seed))
    splits = Splits(train, validation, test)
    for name, rows in splits.items():
        if not rows:
            raise DataError(f"the {name} split is empty; give more data or lower the fractions")
        _check_fields(name, rows, required)
    splits.record = {
        "source": source,
        "split_seed": seed,
        "carved": carved,
        "sizes": {name: len(rows) for name, rows in splits.items()},
        "train_available": available,
        "train_size": train_size,
    }
    return splits


# A source's description (JSON-able), its training examples, and its validation / test examples where it has them.
Loaded = tuple[dict[str, Any], list[Record], dict[str, list[Record] | None]]


def _load_source(data: Mapping[str, Any]) -> Loaded:
    if data.get("train"):
        files = {s: data.get(s) for s in SPLITS}
        train = read_records(data["train"])
        held_out = {s: read_records(p) if p else None for s, p in files.items() if s != "train"}
        return {"kind": "files", **{s: str(p) for s, p in files.items() if p}}, train, held_out
    if data.get("dataset"):
        return _load_hub(data)
    raise DataError("the spec names no training data: set data.train (a local file) or data.dataset (a hub id)")


def _load_hub(data: Mapping[str, Any]) -> Loaded:
    import datasets

    name, config = data["dataset"], data.get("dataset_config")
    try:
        dsd = datasets.load_dataset(name, config)
    except Exception as exc:  # connection, missing data set, bad config: all end the trial
        raise DataError(f"cannot load data set {name!r} (config {config!r}) with datasets.load_dataset: "
                        f"{type(exc).__name__}: {exc}. Check the id, or download it and point data.train "
                        "at local files") from exc
    names = {"train": data.get("train_split", "train"), "validation": data.get("validation_split"),
             "test": data.get("test_split")}
    if names["train"] not in dsd:
        raise DataError(f"data set {name!r} has no split {names['train']!r}; it has {sorted(dsd)}")
    train = _rows_with_label_names(dsd[names["train"]])
    held_out = {s: (_rows_with_label_names(dsd[n]) if n and n in dsd else None) for s, n in names.items()
                if s != "train"}
    source = {"kind": "hub", "dataset": name, "config": config, "train": names["train"],
              **{s: n for s, n in names.items() if held_out.get(s) is not None}}
    return source, train, held_out


def _rows_with_label_names(split: Any) -> list[Record]:
    """Rows of a hub split with ClassLabel ids (also inside lists, e.g. NER tags) replaced by their names."""
    rows = split.to_list()
    for column, feature in split.features.items():
        names = getattr(feature, "names", None)
        inner = getattr(getattr(feature, "feature", None), "names", None)
        for row in rows:
            if names is not None and isinstance(row[column], int):
                row[column] = names[row[column]]
            elif inner is not None and isinstance(row[column], list):
                row[column] = [inner[v] for v in row[column]]
    return rows


def _carve(rows: list[Record], fraction: float, rng: np.random.Generator, name: str
           ) -> tuple[list[Record], list[Record]]:
    n = max(1, math.floor(len(rows) * fraction))
    if n >= len(rows):
        raise DataError(f"cannot carve a {name} split of {fraction:.0%} from {len(rows)} training examples; "
                        f"give a {name} file or more training data")
    order = rng.permutation(len(rows))
    held = set(order[:n].tolist())
    return ([r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)])


def _subsample(rows: list[Record], n: int, rng: np.random.Generator) -> list[Record]:
    if n >= len(rows):
        return rows
    return [rows[i] for i in sorted(rng.permutation(len(rows))[:n].tolist())]


def _check_fields(split: str, rows: list[Record], required: tuple[str, ...]) -> None:
    missing = [f for f in required if f not in rows[0]]
    if missing:
        raise DataError(f"the {split} examples have no field {missing[0]!r} (they have {sorted(rows[0])}); "
                        f"name the right column in the spec's data section (e.g. data.text / data.label)")
    for i, row in enumerate(rows):
        for f in required:
            if row.get(f) is None or (isinstance(row[f], float) and math.isnan(row[f])):
                raise DataError(f"{split} example {i} has an empty {f!r}; drop it or fill it in")


def label_vocabulary(splits: Splits, field_name: str, *, sequence: bool = False) -> list[Any]:
    """Sorted unique labels over all splits (so ids agree across trials and workers).

    With `sequence=True` each example's field is a list (token tags). Mixed int/str labels are sorted
    by their string form.
    """
    values: set[Any] = set()
    for _, rows in splits.items():
        for row in rows:
            v = row[field_name]
            if sequence:
                if not isinstance(v, (list, tuple)):
                    raise DataError(f"field {field_name!r} must be a list of tags per example, got {v!r}")
                values.update(v)
            else:
                values.add(v)
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)
