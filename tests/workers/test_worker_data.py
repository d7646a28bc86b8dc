"""Data loading, split carving, label vocabularies, metrics and the demo's packaged data."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tunefleet.demo.data import DEMO_SIZES, demo_model_path, demo_spec, write_bbc_news
from tunefleet.workers.data import load_splits, read_records
from tunefleet.workers.errors import DataError
from tunefleet.workers.evaluation import (
    attribute_metrics,
    bio_entities,
    classification_metrics,
    entity_metrics,
    parse_json_object,
)

ROWS = [{"text": f"doc {i}", "label": "ab"[i % 2]} for i in range(100)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_reads_each_format(suffix, tmp_path):
    path = tmp_path / f"d{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    assert read_records(path) == ROWS


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported extension"):
        read_records(path)


def test_carving_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = {"train": str(path), "split_seed": 5, "validation_fraction": 0.2, "test_fraction": 0.1}
    a = load_splits(data, required=("text", "label"))
    b = load_splits(data, required=("text", "label"))
    assert a.test == b.test and a.validation == b.validation
    texts = [{r["text"] for r in split} for _, split in a.items()]
    assert sum(map(len, texts)) == 100 and not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert a.record["sizes"] == {"train": 72, "validation": 18, "test": 10}
    c = load_splits({**data, "split_seed": 6}, required=("text", "label"))
    assert c.test != a.test


def test_caps_and_train_size(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = {"train": str(path), "max_train_samples": 50, "max_eval_samples": 5}
    splits = load_splits(data, required=("text",), train_size=20)
    assert splits.record["sizes"] == {"train": 20, "validation": 5, "test": 5}
    with pytest.raises(DataError, match="train_size=60"):
        load_splits(data, required=("text",), train_size=60)


def test_hub_failure_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load data set"):
        load_splits({"dataset": "no-such-user/no-such-data"}, required=("text",))


def test_classification_metrics():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2])
    assert m["accuracy"] == 0.75
    assert m["recall_macro"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_bio_entities_and_entity_f1():
    assert bio_entities(["B-C", "I-C", "O", "B-S", "I-C"]) == {("C", 0, 2), ("S", 3, 4), ("C", 4, 5)}
    m = entity_metrics([["B-C", "I-C", "O", "B-S"]], [["B-C", "O", "O", "B-S"]])
    # predicted {C 0-1, S 3-4}, true {C 0-2, S 3-4}: one of two right each way
    assert m["entity_precision"] == m["entity_recall"] == m["entity_f1"] == 0.5
    assert m["token_accuracy"] == 0.75


def test_attribute_metrics_and_json_parsing():
    assert parse_json_object('{ " color " : " red " } [SEP] junk }') == {" color ": " red "}
    assert parse_json_object("no object") is None
    m = attribute_metrics([{"color": "Red", "size": "L"}, {"color": "blue"}],
                          [{" color ": " red ", "size": "l"}, None])
    assert m["exact_match"] == 0.5
    assert m["attribute_precision"] == 1.0 and m["attribute_recall"] == pytest.approx(2 / 3)


def test_demo_model_and_data(tmp_path):
    assert (demo_model_path() / "model.safetensors").is_file()
    paths = write_bbc_news(tmp_path, seed=0)
    sizes = {split: len(path.read_text().splitlines()) for split, path in paths.items()}
    assert sizes == {"train": 2225 - 700, **DEMO_SIZES}
    first = json.loads(paths["train"].read_text().splitlines()[0])
    assert set(first) == {"text", "label"}
    assert {json.loads(line)["label"] for line in paths["test"].read_text().splitlines()} == {
        "business", "entertainment", "politics", "sports", "tech"}
    again = write_bbc_news(tmp_path / "again", seed=0)
    assert again["test"].read_text() == paths["test"].read_text()


def test_demo_spec_is_a_valid_study(tmp_path):
    from tunefleet.service.spec import validate_spec

    spec = validate_spec(demo_spec(tmp_path))
    assert spec.rungs()[0] == 20 and spec.rungs()[-1] == 100
    assert spec.budget.max_trials == 16


def test_hub_data_set_splits_and_label_names(monkeypatch):
    """The hub path (datasets.load_dataset stubbed): split names, carving, ClassLabel ids → names."""
    import datasets

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-X"]))})
    train = datasets.Dataset.from_dict({"tokens": [["a", "b"]] * 40, "tags": [[1, 0]] * 40}, features=features)
    calls = []

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        return datasets.DatasetDict({"train": train, "dev": train.select(range(5))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_splits({"dataset": "someone/ner", "dataset_config": "en", "validation_split": "dev",
                          "test_split": "test", "test_fraction": 0.25}, required=("tokens", "tags"))
    assert calls == [("someone/ner", "en")]
    assert splits.record["source"] == {"kind": "hub", "dataset": "someone/ner", "config": "en", "train": "train",
                                       "validation": "dev"}
    assert splits.record["sizes"] == {"train": 30, "validation": 5, "test": 10}
    assert splits.train[0]["tags"] == ["B-X", "O"]
