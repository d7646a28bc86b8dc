"""Each fine-tuning method trains exactly the weights it should."""

from __future__ import annotations

import pytest

from tests.workers.fakes import Reports
from tunefleet.service.spec import TASK_METRICS
from tunefleet.workers.errors import InvalidConfig
from tunefleet.workers.methods import apply_method, count_parameters
from tunefleet.workers.tasks import TASKS
from tunefleet.workers.training import resolve_config, run_trial

LABELS = ["bad", "good"]


def _model(cache, path, task="sequence-classification", labels=LABELS):
    return cache.model(str(path), TASKS[task], labels, seed=0).model


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _targets(model) -> set[str]:
    """Names of the modules that got LoRA adapters."""
    return {n.split(".lora_A")[0].split(".")[-1] for n in _trainable(model) if "lora_A" in n}


def _config(**params):
    return resolve_config({"seed": 0}, params)


def test_lora_trains_adapters_and_the_new_head(cache, tiny_bert):
    model = apply_method(_model(cache, tiny_bert), _config(method="lora", lora_r=4), TASKS["sequence-classification"])
    names = _trainable(model)
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert any("classifier" in n for n in names)
    assert _targets(model) == {"query", "value"}  # peft's default for BERT
    # rank 4: each A is (4, 64)
    assert all(p.shape[0] == 4 for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad)


def test_lora_target_modules_all_linear_and_list(cache, tiny_bert):
    task = TASKS["sequence-classification"]
    all_linear = apply_method(_model(cache, tiny_bert), _config(lora_target_modules="all-linear"), task)
    listed = apply_method(_model(cache, tiny_bert), _config(lora_target_modules="key, dense"), task)
    assert {"query", "key", "value", "dense"} <= _targets(all_linear)
    assert _targets(listed) == {"key", "dense"}


def test_lora_on_llama_targets_q_and_v(cache, tiny_llama):
    model = apply_method(cache.model(str(tiny_llama), TASKS["causal-lm"], None, seed=0).model, _config(),
                         TASKS["causal-lm"])
    assert _targets(model) == {"q_proj", "v_proj"}
    assert all("lora_" in n for n in _trainable(model))


def test_ia3_trains_scaling_vectors_and_the_head(cache, tiny_bert):
    model = apply_method(_model(cache, tiny_bert), _config(method="ia3"), TASKS["sequence-classification"])
    names = _trainable(model)
    assert any("ia3_" in n for n in names) and any("classifier" in n for n in names)
    assert all("ia3_" in n or "classifier" in n for n in names)
    trainable, total = count_parameters(model)
    assert trainable < total / 100


def test_partial_trains_top_layers_and_head(cache, tiny_bert):
    model = apply_method(_model(cache, tiny_bert), _config(method="partial", partial_top_k=1),
                         TASKS["sequence-classification"])
    names = _trainable(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("bert.encoder.layer.1.", "classifier."))}


def test_partial_rejects_too_many_layers(cache, tiny_bert):
    with pytest.raises(InvalidConfig, match="partial_top_k=5"):
        apply_method(_model(cache, tiny_bert), _config(method="partial", partial_top_k=5),
                     TASKS["sequence-classification"])


def test_full_trains_everything(cache, tiny_bert):
    model = apply_method(_model(cache, tiny_bert), _config(method="full"), TASKS["sequence-classification"])
    trainable, total = count_parameters(model)
    assert trainable == total


def test_token_classification_head_stays_trainable_under_lora(cache, tiny_bert):
    model = apply_method(_model(cache, tiny_bert, "token-classification", ["B-X", "I-X", "O"]), _config(),
                         TASKS["token-classification"])
    assert any("classifier" in n for n in _trainable(model))


def test_unknown_method_is_invalid(cache, tiny_bert):
    with pytest.raises(InvalidConfig, match="unknown method"):
        apply_method(_model(cache, tiny_bert), _config(method="prefix"), TASKS["sequence-classification"])


@pytest.mark.parametrize("method", ["lora", "ia3", "partial", "full"])
def test_each_method_trains_end_to_end(method, make_spec, tmp_path, cache):
    frozen_before = {n: p.clone() for n, p in _model(cache, make_spec()["model"]).named_parameters()}
    out = run_trial(make_spec(sizes=(64, 16, 16), fixed={"method": method}), {}, [50, 100], Reports(),
                    workdir=tmp_path, model_cache=cache)
    assert not out.pruned and out.extra["trainable_params"] > 0
    assert set(out.validation_metrics) == set(TASK_METRICS["sequence-classification"])  # eval loss under PEFT too
    if method != "full":
        assert out.extra["trainable_params"] < out.extra["total_params"]
    # The cached pristine base is untouched by training.
    after = dict(_model(cache, make_spec()["model"]).named_parameters())
    assert all(p.equal(after[n]) for n, p in frozen_before.items() if "classifier" not in n)
