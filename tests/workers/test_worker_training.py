"""run_trial end to end on tiny models: tasks, rungs, pruning, faults, artifacts, the model cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from tests.workers.conftest import GENERATIVE
from tests.workers.fakes import Generator, Reports
from tunefleet.service.spec import TASK_METRICS
from tunefleet.workers.errors import DataError, ModelLoadError, NonFiniteLoss, OutOfMemory, TrialInterrupted
from tunefleet.workers.training import _rung_steps, _TaskTrainer, resolve_config, run_trial

RUNGS = [20, 60, 100]


@pytest.mark.parametrize("task", list(TASK_METRICS))
def test_each_task_trains_and_reports_its_metrics(task, make_spec, tmp_path, cache):
    reports = Reports()
    # causal-lm and sft evaluate by greedy generation over a 30k vocabulary: keep their splits small
    sizes = (64, 8, 8) if task in GENERATIVE else (96, 32, 32)
    out = run_trial(make_spec(task, sizes=sizes), {}, RUNGS, reports, workdir=tmp_path, model_cache=cache)

    assert reports.percents == RUNGS
    assert not out.pruned
    assert set(out.validation_metrics) == set(TASK_METRICS[task])
    assert set(out.test_metrics) == {*TASK_METRICS[task], "n_examples"} and out.test_metrics["n_examples"] > 0
    assert all(set(m) == set(TASK_METRICS[task]) for _, _, m in reports.calls)
    # The final report is the trial's value: validation at 100%.
    objective = make_spec(task)["objective"]["metric"]
    assert out.value == reports.calls[-1][1] == out.validation_metrics[objective]
    assert out.values is None
    for key in ("train_seconds", "gpu_hours", "peak_memory_mb", "samples_per_second", "total_steps",
                "model_load_seconds", "base_model_cached"):
        assert key in out.extra


def test_classification_learns_the_keyword(make_spec, tmp_path, cache):
    spec = make_spec(sizes=(160, 32, 32), fixed={"num_epochs": 2})
    out = run_trial(spec, {}, [100], Reports(), workdir=tmp_path, model_cache=cache)
    assert out.validation_metrics["accuracy"] >= 0.9
    assert out.test_metrics["accuracy"] >= 0.9


def test_reports_at_the_right_steps(make_spec, tmp_path, cache):
    # 80 examples / batch 16 = 5 steps per epoch, 3 epochs = 15 steps: rungs at steps 3, 9, 15.
    steps: list[int] = []
    original = _TaskTrainer.evaluate

    def spy(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original(self, *args, **kwargs)

    reports = Reports()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_TaskTrainer, "evaluate", spy)
        out = run_trial(make_spec(sizes=(80, 16, 16), fixed={"num_epochs": 3}), {}, RUNGS, reports,
                        workdir=tmp_path, model_cache=cache)
    assert out.extra["total_steps"] == 15
    assert reports.percents == RUNGS
    assert steps == [3, 9, 15, 15]  # three rungs, then the test split once


def test_rung_steps_round_up_and_share_a_step():
    assert _rung_steps([20, 60, 100], 30) == {6: [20], 18: [60], 30: [100]}
    assert _rung_steps([20, 60, 100], 7) == {2: [20], 5: [60], 7: [100]}
    assert _rung_steps([10, 20, 100], 3) == {1: [10, 20], 3: [100]}


def test_prune_stops_training_and_skips_test(make_spec, tmp_path, cache):
    prefixes: list[str] = []
    original = _TaskTrainer.evaluate

    def spy(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        prefixes.append(metric_key_prefix)
        return original(self, eval_dataset, ignore_keys, metric_key_prefix)

    reports = Reports(prune_at=20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_TaskTrainer, "evaluate", spy)
        out = run_trial(make_spec(sizes=(80, 16, 16), fixed={"num_epochs": 3}), {}, RUNGS, reports,
                        workdir=tmp_path, model_cache=cache)
    assert out.pruned and out.value is None and out.test_metrics == {} and out.artifact_dir is None
    assert reports.percents == [20]
    assert out.extra["steps_done"] == 3
    assert prefixes == ["eval"]
    assert set(out.validation_metrics) == set(TASK_METRICS["sequence-classification"])


def test_test_split_is_carved_when_absent_and_never_reported(make_spec, tmp_path, cache):
    order: list[str] = []
    original = _TaskTrainer.evaluate

    def spy(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        order.append(metric_key_prefix)
        return original(self, eval_dataset, ignore_keys, metric_key_prefix)

    def report(pct, value, metrics):
        order.append(f"report {pct}")
        return "continue"

    spec = make_spec(sizes=(100, 0, 0), data={"validation_fraction": 0.2, "test_fraction": 0.1, "split_seed": 3})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_TaskTrainer, "evaluate", spy)
        out = run_trial(spec, {}, RUNGS, report, workdir=tmp_path, model_cache=cache)
    assert out.data_splits["carved"] == ["test", "validation"]
    assert out.data_splits["sizes"] == {"train": 72, "validation": 18, "test": 10}
    assert out.data_splits["split_seed"] == 3
    assert order[-1] == "test" and order.count("test") == 1  # after every report, once
    saved = json.loads((out.artifact_dir / "data_splits.json").read_text())
    assert saved["sizes"] == out.data_splits["sizes"]


def test_train_size_subsamples_the_training_split(make_spec, tmp_path, cache):
    out = run_trial(make_spec(), {"train_size": 64}, [100], Reports(), workdir=tmp_path, model_cache=cache)
    assert out.data_splits["sizes"]["train"] == 64
    assert out.extra["total_steps"] == 4


def test_artifacts_are_safetensors_with_the_trainer_log(make_spec, tmp_path, cache):
    out = run_trial(make_spec(fixed={"method": "lora"}), {}, [100], Reports(), workdir=tmp_path, model_cache=cache)
    files = {p.name for p in out.artifact_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_log.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    log = json.loads((out.artifact_dir / "trainer_log.json").read_text())
    assert any("loss" in entry for entry in log) and any("eval_accuracy" in entry for entry in log)

    from safetensors.torch import load_file

    tensors = load_file(out.artifact_dir / "adapter_model.safetensors")
    assert any("lora_" in k for k in tensors) and any("classifier" in k for k in tensors)


def test_multi_objective_gives_values(make_spec, tmp_path, cache):
    objectives = [{"metric": "accuracy", "direction": "maximize"}, {"metric": "loss", "direction": "minimize"}]
    out = run_trial(make_spec(sizes=(32, 16, 16), objective=objectives), {}, [100], Reports(), workdir=tmp_path,
                    model_cache=cache)
    assert out.value is None
    assert out.values == [out.validation_metrics["accuracy"], out.validation_metrics["loss"]]


def test_model_cache_reuses_the_base_model(make_spec, tmp_path, cache):
    spec = make_spec(sizes=(32, 16, 16))
    first = run_trial(spec, {}, [100], Reports(), workdir=tmp_path / "1", model_cache=cache)
    second = run_trial(spec, {}, [100], Reports(), workdir=tmp_path / "2", model_cache=cache)
    assert first.extra["base_model_cached"] == 0.0
    assert second.extra["base_model_cached"] == 1.0


def test_cached_copy_is_fresh_and_seeded(tiny_bert, cache):
    from tunefleet.workers.tasks import TASKS

    task = TASKS["sequence-classification"]
    a = cache.model(str(tiny_bert), task, ["a", "b"], seed=1).model
    with torch.no_grad():
        a.bert.embeddings.word_embeddings.weight.add_(1.0)  # a trial changing its copy
    b = cache.model(str(tiny_bert), task, ["a", "b"], seed=1).model
    c = cache.model(str(tiny_bert), task, ["a", "b"], seed=2).model
    assert not torch.equal(a.bert.embeddings.word_embeddings.weight, b.bert.embeddings.word_embeddings.weight)
    again = cache.model(str(tiny_bert), task, ["a", "b"], seed=1).model
    assert torch.equal(b.classifier.weight, again.classifier.weight)
    assert not torch.equal(b.classifier.weight, c.classifier.weight)


def test_nan_loss_raises_non_finite_loss(make_spec, tmp_path, cache):
    def nan_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_TaskTrainer, "compute_loss", nan_loss, raising=False)
        with pytest.raises(NonFiniteLoss) as info:
            run_trial(make_spec(), {}, RUNGS, Reports(), workdir=tmp_path, model_cache=cache)
    assert "learning_rate" in info.value.reason and info.value.retryable is False


def test_diverging_learning_rate_raises_non_finite_loss(make_spec, tmp_path, cache):
    with pytest.raises(NonFiniteLoss):
        run_trial(make_spec(fixed={"num_epochs": 3}), {"learning_rate": 1e12, "max_grad_norm": 0.0}, RUNGS,
                  Reports(), workdir=tmp_path, model_cache=cache)


def test_out_of_memory_raises_out_of_memory(make_spec, tmp_path, cache):
    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "training_step", oom)
        with pytest.raises(OutOfMemory) as info:
            run_trial(make_spec(), {}, RUNGS, Reports(), workdir=tmp_path, model_cache=cache)
    assert "per_device_batch_size" in info.value.reason and info.value.retryable is False


def test_runtime_error_out_of_memory_is_out_of_memory(make_spec, tmp_path, cache):
    def oom(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory) out of memory")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "training_step", oom)
        with pytest.raises(OutOfMemory):
            run_trial(make_spec(), {}, RUNGS, Reports(), workdir=tmp_path, model_cache=cache)


def test_should_stop_interrupts(make_spec, tmp_path, cache):
    calls = iter(range(1000))

    with pytest.raises(TrialInterrupted):
        run_trial(make_spec(), {}, RUNGS, Reports(), workdir=tmp_path, model_cache=cache,
                  should_stop=lambda: next(calls) >= 3)


@pytest.mark.parametrize("content, expected", [
    ("{not json}\n", "line 1 is not valid JSON"),
    ('{"text": "a"}\n{"text": "b"}\n', "no field 'label'"),
    ("", "holds no examples"),
])
def test_bad_data_file_raises_data_error(content, expected, make_spec, tmp_path, cache):
    spec = make_spec()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    spec["data"]["train"] = str(bad)
    with pytest.raises(DataError) as info:
        run_trial(spec, {}, RUNGS, Reports(), workdir=tmp_path, model_cache=cache)
    assert expected in info.value.reason and not info.value.retryable


def test_missing_data_file_raises_data_error(make_spec, tmp_path, cache):
    spec = make_spec()
    spec["data"]["validation"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        run_trial(spec, {}, RUNGS, Reports(), workdir=tmp_path, model_cache=cache)


def test_unknown_model_raises_model_load_error(make_spec, tmp_path, cache):
    spec = make_spec()
    spec["model"] = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError) as info:
        run_trial(spec, {}, RUNGS, Reports(), workdir=tmp_path, model_cache=cache)
    assert "no-such-model" in info.value.reason and not info.value.retryable


def test_effective_config_layers_defaults_fixed_and_params():
    spec = {"fixed": {"learning_rate": 1e-3, "lora_r": 4}, "seed": 7}
    config = resolve_config(spec, {"learning_rate": 2e-4})
    assert config["learning_rate"] == 2e-4 and config["lora_r"] == 4 and config["lora_alpha"] == 8
    assert config["seed"] == 7 and config["method"] == "lora"


def test_artifact_dir_is_under_workdir(make_spec, tmp_path, cache):
    out = run_trial(make_spec(sizes=(32, 16, 16)), {}, [100], Reports(), workdir=tmp_path / "w", model_cache=cache)
    assert out.artifact_dir == Path(tmp_path / "w" / "artifact")



def _causal_prepared(make_spec, cache):
    from tunefleet.service.spec import DataSpec
    from tunefleet.workers.data import load_splits
    from tunefleet.workers.tasks import TASKS

    task, spec = TASKS["causal-lm"], make_spec("causal-lm", sizes=(16, 8, 8))
    data = DataSpec.model_validate(spec["data"]).model_dump()
    tokenizer = cache.tokenizer(spec["model"])
    task.prepare_tokenizer(tokenizer)
    prepared = task.prepare(load_splits(data, required=task.required_fields(data)), tokenizer, data, None, 64)
    return task, tokenizer, prepared


def test_causal_lm_generation_scores_right_and_wrong_answers(make_spec, cache):
    """Decoding, JSON parsing and attribute scoring over left-padded batches, with the WordPiece tokenizer."""
    task, tokenizer, prepared = _causal_prepared(make_spec, cache)
    answers = {tuple(prompt): feature["input_ids"][len(prompt):]  # the target tokens + eos
               for (prompt, _), feature in zip(prepared.references["test"], prepared.test, strict=True)}
    oracle = Generator(lambda prompt: answers[tuple(prompt)], tokenizer.pad_token_id)
    right = task.generation_metrics(oracle, tokenizer, prepared, "test", batch_size=3)
    assert right == {"exact_match": 1.0, "attribute_f1": 1.0, "attribute_precision": 1.0, "attribute_recall": 1.0}
    assert len(oracle.prompts) == 8

    junk = tokenizer('{"color": "purple"} and more', add_special_tokens=False)["input_ids"]
    wrong = task.generation_metrics(Generator(lambda prompt: junk, tokenizer.pad_token_id), tokenizer, prepared,
                                    "test", batch_size=3)
    assert wrong["exact_match"] == 0.0 and wrong["attribute_precision"] == 0.0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_decoder_without_a_pad_token_classifies_in_padded_batches(method, make_spec, tiny_llama, tmp_path, cache):
    # Decoder LMs (Llama, GPT-2, SmolLM2 from a GGUF file) often ship no pad token and no pad_token_id; their
    # classification head reads the last non-padding token, so the worker pads with eos and tells the config.
    from transformers import AutoTokenizer, LlamaConfig

    model = tmp_path / "no-pad-llama"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.pad_token = None
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.pad_token_id = None
    shutil.copytree(tiny_llama, model)
    config.save_pretrained(model)
    tokenizer.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    spec = make_spec("sequence-classification", fixed={"method": method, "num_epochs": 1})
    spec["model"] = str(model)
    reports = Reports()
    outcome = run_trial(spec, {"learning_rate": 3e-3}, [50, 100], reports, workdir=tmp_path / "w", model_cache=cache)
    assert [pct for pct, _, _ in reports.calls] == [50, 100]
    assert 0.0 <= outcome.value <= 1.0 and outcome.test_metrics["n_examples"] == 48
