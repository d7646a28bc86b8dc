"""A model or tokenizer named by a local path that does not exist is reported as a missing folder, with its path,
not as transformers' "Repo id must be in the form ..."; hub ids and existing folders load as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.fakes import Reports
from tunefleet.workers.errors import ModelLoadError
from tunefleet.workers.model_cache import ModelCache, looks_like_local_path
from tunefleet.workers.tasks import get_task
from tunefleet.workers.training import run_trial


def test_missing_model_folder_in_a_trial_names_the_folder(make_spec, tmp_path: Path, cache: ModelCache) -> None:
    spec = make_spec()
    missing = tmp_path / "models" / "bert-tuned"
    spec["model"] = str(missing)
    with pytest.raises(ModelLoadError) as info:
        run_trial(spec, {}, [20, 100], Reports(), workdir=tmp_path, model_cache=cache)
    assert str(missing) in info.value.reason and "does not exist" in info.value.reason
    assert "Repo id" not in info.value.reason and not info.value.retryable


def test_relative_missing_folder_gives_the_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         cache: ModelCache) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        cache.tokenizer("./checkpoints/run-3")
    assert "tokenizer folder ./checkpoints/run-3 does not exist" in info.value.reason
    assert str(tmp_path / "checkpoints" / "run-3") in info.value.reason
    with pytest.raises(ModelLoadError, match="model folder ../elsewhere/model does not exist"):
        cache.model("../elsewhere/model", get_task("sequence-classification"), ["a", "b"], seed=0)


def test_home_relative_missing_folder_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  cache: ModelCache) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        cache.tokenizer("~/models/missing")
    assert str(tmp_path / "models" / "missing") in info.value.reason


def test_existing_relative_folder_still_loads(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch,
                                              cache: ModelCache) -> None:
    monkeypatch.chdir(tiny_bert.parent)
    name = f"./{tiny_bert.name}"
    assert cache.tokenizer(name).vocab_size > 0
    loaded = cache.model(name, get_task("sequence-classification"), ["bad", "good"], seed=0)
    assert loaded.model.config.num_labels == 2


@pytest.mark.parametrize(("name", "local"), [
    ("bert-base-uncased", False), ("sentence-transformers/all-MiniLM-L6-v2", False),
    ("/models/bert", True), ("./bert", True), ("../bert", True), ("~/bert", True), ("models/bert/v2", True),
    (".", True),
])
def test_which_names_are_local_paths(name: str, local: bool) -> None:
    assert looks_like_local_path(name) is local


def test_hub_id_is_not_reported_as_a_missing_folder(cache: ModelCache) -> None:
    # Offline (tests/workers/conftest.py) an uncached hub id cannot load, but it is not called a folder.
    with pytest.raises(ModelLoadError) as info:
        cache.tokenizer("tunefleet-tests/no-such-model")
    assert "does not exist on this worker" not in info.value.reason
