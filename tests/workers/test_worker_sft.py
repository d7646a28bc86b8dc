"""Task sft: the loss on completions only (prompt/completion pairs, chat messages with and without a chat
template), exact match and a user's scorer on greedy generations, pause and resume, method qlora's refusal on
CPU; and a study against a live server on PostgreSQL whose worker reports at 20% and is pruned there."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer, make_settings
from tests.workers.conftest import chat_rows, instruction_rows, write_jsonl
from tests.workers.fakes import Generator, Reports
from tunefleet.service.client import ApiError, Client
from tunefleet.service.spec import DataSpec, SpecError, validate_spec
from tunefleet.workers.data import Splits
from tunefleet.workers.errors import DataError, InvalidConfig
from tunefleet.workers.evaluation import load_scorer
from tunefleet.workers.loop import HFTrainer, WorkerLoop
from tunefleet.workers.model_cache import ModelCache
from tunefleet.workers.tasks import IGNORE, TASKS, Prepared
from tunefleet.workers.training import run_trial

SFT = TASKS["sft"]
DATA = DataSpec(train="unused.jsonl").model_dump()
SCORER = f"{__name__}:same_first_letter"


def same_first_letter(prediction: str, reference: str) -> float:
    """A user's scorer, as a spec names it (module:function)."""
    return float(prediction.strip()[:1] == reference.strip()[:1])


def _tokenizer(cache: ModelCache, model: Path) -> Any:
    tokenizer = cache.tokenizer(str(model))
    SFT.prepare_tokenizer(tokenizer)
    return tokenizer


def _prepare(rows: list[dict[str, Any]], tokenizer: Any) -> Prepared:
    return SFT.prepare(Splits(rows, rows, rows), tokenizer, DATA, None, 64)


def _completion(feature: dict[str, Any], prompt_ids: list[int]) -> list[int]:
    """The learned tokens of a feature, after checking that the prompt's are all masked."""
    n = len(prompt_ids)
    assert feature["input_ids"][:n] == prompt_ids and feature["labels"][:n] == [IGNORE] * n
    assert feature["labels"][n:] == feature["input_ids"][n:]
    return feature["labels"][n:]


def test_prompt_completion_pairs_learn_the_completion_and_eos_only(tiny_llama, cache) -> None:
    tokenizer = _tokenizer(cache, tiny_llama)
    rows = instruction_rows(6, seed=0)
    prepared = _prepare(rows, tokenizer)
    for row, feature, (prompt_ids, (reference, decoded)) in zip(rows, prepared.train, prepared.references["train"],
                                                                 strict=True):
        learned = _completion(feature, prompt_ids)
        assert learned == [*tokenizer(row["completion"], add_special_tokens=False)["input_ids"],
                           tokenizer.eos_token_id]
        assert prompt_ids[0] == tokenizer.bos_token_id or tokenizer.bos_token_id is None
        assert reference == decoded == row["completion"]
    batch = prepared.collator(prepared.train[:4])  # padded labels stay out of the loss too
    assert int((batch["labels"] != IGNORE).sum()) == sum(len(f["labels"]) - f["labels"].count(IGNORE)
                                                         for f in prepared.train[:4])


@pytest.mark.parametrize("form", ["messages", "prompt-completion lists"])
def test_chat_examples_use_the_chat_template_and_learn_the_last_answer_only(form, tiny_chat_llama, cache) -> None:
    tokenizer = _tokenizer(cache, tiny_chat_llama)
    chat = [{"role": "system", "content": "name the colour"}, {"role": "user", "content": "colour : red box"},
            {"role": "assistant", "content": "red"}, {"role": "user", "content": "colour : a blue item"},
            {"role": "assistant", "content": "blue"}]
    row = {"messages": chat} if form == "messages" else {"prompt": chat[:-1], "completion": chat[-1:]}
    example = SFT.render(row, DATA, tokenizer, "example")
    assert example.templated and example.reference == "blue"
    assert example.prompt == tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
    assert example.prompt.endswith("colour : a blue item [SEP] assistant : ")
    assert example.completion == "blue [SEP] "
    prepared = _prepare([row], tokenizer)
    (prompt_ids, (_, decoded)), feature = prepared.references["train"][0], prepared.train[0]
    learned = _completion(feature, prompt_ids)
    # The earlier answer "red" is context; the template's own [SEP] ends the answer, and no second eos is added.
    assert tokenizer.convert_ids_to_tokens(learned) == ["blue", "[SEP]"]
    assert "red" in tokenizer.decode(prompt_ids) and decoded == "blue"


def test_chat_messages_without_a_template_use_the_plain_one(tiny_llama, cache) -> None:
    tokenizer = _tokenizer(cache, tiny_llama)
    example = SFT.render(chat_rows(1, seed=0)[0], DATA, tokenizer, "example")
    question = chat_rows(1, seed=0)[0]["messages"][1]["content"]
    assert example.prompt == f"system: name the colour\nuser: {question}\nassistant: "
    assert example.completion == example.reference and not example.templated


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with the assistant's answer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}, "chat messages"),
    ({"text": "hello"}, "neither 'messages'"),
    ({"prompt": "hi", "completion": [{"role": "assistant", "content": "hello"}]}, "not one of each"),
])
def test_bad_examples_are_data_errors_naming_the_fix(row, message, tiny_llama, cache) -> None:
    with pytest.raises(DataError, match=message):
        _prepare([row], _tokenizer(cache, tiny_llama))


def test_exact_match_and_the_scorer_are_computed_on_generations(tiny_llama, cache) -> None:
    tokenizer = _tokenizer(cache, tiny_llama)
    rows = instruction_rows(8, seed=3)
    prepared = _prepare(rows, tokenizer)
    prepared.scorer = load_scorer(SCORER)
    answers = {tuple(prompt): feature["input_ids"][len(prompt):]  # the completion's tokens + eos
               for (prompt, _), feature in zip(prepared.references["test"], prepared.test, strict=True)}
    right = Generator(lambda prompt: answers[tuple(prompt)], tokenizer.pad_token_id)
    assert SFT.generation_metrics(right, tokenizer, prepared, "test", batch_size=3) == {"exact_match": 1.0,
                                                                                        "score": 1.0}
    assert len(right.prompts) == 8
    # Every other prompt answered "rose": wrong, but the scorer credits it where the answer is "red".
    rose = tokenizer("rose", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    knows = {tuple(prompt) for prompt, _ in prepared.references["test"][0::2]}
    half = Generator(lambda prompt: answers[tuple(prompt)] if tuple(prompt) in knows else rose, tokenizer.pad_token_id)
    metrics = SFT.generation_metrics(half, tokenizer, prepared, "test", batch_size=8)
    reds = sum(r["completion"] == "red" for r in rows[1::2])
    assert metrics == {"exact_match": 0.5, "score": pytest.approx((4 + reds) / 8)}


def _spec(make_spec: Callable[..., dict[str, Any]], model: Path, tmp_path: Path, max_steps: int = 10,
          **overrides: Any) -> dict[str, Any]:
    """A LoRA study of chat messages with a chat template and a scorer. Small batches: the 30k vocabulary's
    output layer is most of a step's cost."""
    spec = make_spec("sft", sizes=(48, 8, 8))
    for split, n in (("train", 48), ("validation", 8), ("test", 8)):
        spec["data"][split] = str(write_jsonl(tmp_path / f"chat-{split}.jsonl", chat_rows(n, seed=len(split))))
    spec["model"] = str(model)
    spec["fixed"].update(max_steps=max_steps, per_device_batch_size=4, method="lora", learning_rate=1e-2)
    spec.update(evaluation={"scorer": SCORER, "max_new_tokens": 4}, **overrides)  # answers: a word + eos
    return spec


def test_paused_at_20_and_resumed_ends_as_an_uninterrupted_run(make_spec, tiny_chat_llama, tmp_path, cache) -> None:
    spec = _spec(make_spec, tiny_chat_llama, tmp_path, max_steps=5)
    whole = run_trial(spec, {}, [20, 60, 100], Reports(), workdir=tmp_path / "whole", model_cache=cache)
    paused = run_trial(spec, {}, [20, 60, 100], Reports(pause_at=20), workdir=tmp_path / "part", model_cache=cache)
    assert paused.paused_at == 20 and paused.checkpoint_dir is not None
    reports = Reports()
    resumed = run_trial(spec, {}, [20, 60, 100], reports, workdir=tmp_path / "part", model_cache=cache,
                        resume_from=paused.checkpoint_dir)
    assert reports.percents == [60, 100]
    assert set(resumed.validation_metrics) == {"exact_match", "score", "loss"}
    assert resumed.validation_metrics == pytest.approx(whole.validation_metrics, abs=1e-6)
    assert resumed.test_metrics == pytest.approx(whole.test_metrics, abs=1e-6)


def test_qlora_on_cpu_fails_the_trial_as_a_config_error_before_loading(make_spec, tiny_llama, tmp_path) -> None:
    spec = make_spec("sft", fixed={"method": "qlora"})
    with pytest.raises(InvalidConfig, match="needs a CUDA GPU.*use method lora"):
        run_trial(spec, {}, [100], Reports(), workdir=tmp_path)


def test_the_spec_names_the_scorer_and_its_metric(make_spec, tiny_llama) -> None:
    spec = make_spec("sft")
    spec["fixed"].pop("learning_rate")  # searched
    spec.update(objective={"metric": "score"}, evaluation={"scorer": SCORER, "max_new_tokens": 16})
    assert validate_spec(spec).metrics() == ("exact_match", "loss", "score")
    problems = {
        "score without a scorer": ({**spec, "evaluation": {}}, ["objective", "metric"], "set evaluation.scorer"),
        "a scorer on another task": ({**spec, "task": "causal-lm", "objective": {"metric": "exact_match"}},
                                     ["evaluation", "scorer"], "needs task: sft"),
        "not module:function": ({**spec, "evaluation": {"scorer": "score.py"}}, ["evaluation", "scorer"], "pattern"),
        "nothing generated": ({**spec, "task": "sequence-classification", "objective": {"metric": "loss"},
                               "evaluation": {"max_new_tokens": 8}}, ["evaluation", "max_new_tokens"], "drop it"),
    }
    for case, (bad, loc, message) in problems.items():
        with pytest.raises(SpecError) as caught:
            validate_spec(bad)
        assert [(e["loc"], message in e["msg"]) for e in caught.value.errors] == [(loc, True)], case


@pytest.fixture
def live(pg_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(make_settings(pg_url, tmp_path / "server")) as server:
        yield server


def test_sft_study_reports_at_20_percent_and_is_pruned_there(live, make_spec, tiny_chat_llama, tmp_path) -> None:
    spec = _spec(make_spec, tiny_chat_llama, tmp_path, name="sft-study",
                 # lr 1e-6 barely moves in 2 steps: its validation loss at 20% is above the baseline's, so it is pruned.
                 search_space={"learning_rate": {"type": "categorical", "choices": [1e-2, 1e-6]}},
                 baseline={"learning_rate": 1e-2}, objective={"metric": "loss", "direction": "minimize"},
                 search={"sampler": "grid", "pruner": "successive_halving", "min_resource": 0.2, "seed": 0},
                 budget={"max_trials": 3})
    spec["fixed"].pop("learning_rate")
    with Client(live.url) as client:
        with pytest.raises(ApiError) as refused:
            client.create_study({**spec, "name": "no-scorer", "evaluation": {}, "objective": {"metric": "score"}})
        assert refused.value.status_code == 422 and "evaluation.scorer" in str(refused.value)
        study = client.create_study(spec)
        worker = WorkerLoop(client, HFTrainer("cpu"), worker_id="sft-worker", device="cpu", once=True,
                            idle_sleep=0.2, workdir=tmp_path / "worker")
        assert worker.run() == 3
        trials = client.list_trials(study["id"])["items"]
        artifacts = {t["id"]: [a["name"] for a in client.list_artifacts(t["id"])] for t in trials}
    (slow,) = [t for t in trials if t["params"]["learning_rate"] == 1e-6]
    assert slow["state"] == "PRUNED" and list(slow["intermediate_values"]) == ["20"] and slow["test_metrics"] == {}
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert min(trials, key=lambda t: t["number"]) in complete, "the baseline (lr 1e-2) trains to the end"
    for t in complete:
        assert list(t["intermediate_values"]) == ["20", "60", "100"]
        assert set(t["validation_metrics"]) == {"exact_match", "score", "loss"}
        assert t["test_metrics"]["n_examples"] == 8 and 0 <= t["test_metrics"]["exact_match"] <= 1
        assert "adapter_model.safetensors" in " ".join(artifacts[t["id"]])
