"""Enqueueing configurations: POST /studies/{id}/trials and `study create --enqueue`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from tests.conftest import LiveServer, study_spec
from tunefleet.cli import app
from tunefleet.service.client import ApiError, Client, ConflictError
from tunefleet.service.storage import PriorTrialsSampler


def test_an_enqueued_configuration_runs_next_with_its_values_and_counts_in_the_budget(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("enq", budget={"max_trials": 3}))
        queued = client.enqueue_trial(study["id"], {"learning_rate": 3e-4, "method": "full"}, note="from a paper")
        assert queued["state"] == "WAITING" and queued["user_attrs"]["enqueued"] == "from a paper"
        first = client.lease("w", {}, "h")
        assert first["is_baseline"], "the baseline still runs first"
        client.complete(first["trial_id"], value=0.5)
        second = client.lease("w", {}, "h")
        assert second["trial_id"] == queued["id"]
        assert second["params"]["learning_rate"] == 3e-4 and second["params"]["method"] == "full"
        assert second["params"]["lora_r"] in (4, 8, 16, 32), "the sampler fills what was left out"
        client.complete(second["trial_id"], value=0.6)
        assert client.get_study(study["id"])["trials_used"] == 2


@pytest.mark.parametrize(("params", "where", "says"), [
    ({"learning_rate": 5.0}, "learning_rate", "outside"),
    ({"method": "qlora"}, "method", "choices"),
    ({"dropout": 0.1}, "dropout", "neither searched nor fixed"),
    ({"max_steps": 10}, "max_steps", "fixed in this study"),
    ({"lora_r": "big"}, "lora_r", "choices"),
])
def test_a_configuration_outside_the_search_space_is_422_naming_the_parameter(server: LiveServer, params, where,
                                                                                says) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("enq-bad"))
        with pytest.raises(ApiError) as caught:
            client.enqueue_trial(study["id"], params)
        assert caught.value.status_code == 422 and where in caught.value.message and says in caught.value.message
        assert client.list_trials(study["id"], state="waiting")["total"] == 1, "only the baseline waits"
        client.stop_study(study["id"])
        with pytest.raises(ConflictError):
            client.enqueue_trial(study["id"], {"learning_rate": 1e-4})


def test_study_create_enqueue_checks_the_file_before_creating_anything(server: LiveServer, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(study_spec("cli-enq")))
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump([{"learning_rate": 3e-4}, {"learning_rate": 1e-3, "lora_r": 16}]))
    bad.write_text(yaml.safe_dump([{"learning_rate": 3e-4}, {"learning_rate": 1e-3, "lora_r": 17}]))
    runner = CliRunner()
    refused = runner.invoke(app, ["--server", server.url, "study", "create", str(spec_file), "--enqueue", str(bad)])
    assert refused.exit_code == 1 and "bad.yaml.1.lora_r" in refused.output
    with Client(server.url) as client:
        assert client.list_studies()["total"] == 0, "nothing was created"
        made = runner.invoke(app, ["--server", server.url, "study", "create", str(spec_file), "--enqueue", str(good),
                                   "-q"])
        assert made.exit_code == 0, made.output
        waiting = client.list_trials(int(made.output.strip()), state="waiting")["items"]
    assert [t["params"].get("learning_rate") for t in waiting] == [5e-5, 3e-4, 1e-3]


def test_a_warm_start_enqueues_the_earlier_studys_best_configurations_after_the_baseline(server: LiveServer) -> None:
    with Client(server.url) as client:
        earlier = client.create_study(study_spec("earlier", baseline=None, budget={"max_trials": 4},
                                                 search={"sampler": "random", "pruner": "none", "seed": 3}))
        finals = {}
        for value in (0.1, 0.3, 0.5, 0.7):  # the later, the better
            lease = client.lease("w", {}, "h")
            client.complete(lease["trial_id"], value=value)
            finals[value] = lease["params"]
        assert client.get_study(earlier["id"])["state"] == "completed"
        spec = study_spec("warm", warm_start={"study": "earlier", "top_k": 2})
        spec["search_space"]["lora_r"] = {"type": "categorical", "choices": [4, 8]}  # 16 and 32 left out
        warm = client.create_study(spec)
        waiting = client.list_trials(warm["id"], state="waiting")["items"]
    assert waiting[0]["is_baseline"] and len(waiting) == 3
    for trial, value in zip(waiting[1:], (0.7, 0.5), strict=True):
        best = finals[value]
        assert trial["user_attrs"]["warm_start_from"] == "earlier" and trial["user_attrs"]["warm_start_value"] == value
        assert trial["params"]["learning_rate"] == best["learning_rate"]
        assert trial["params"].get("lora_r") == (best["lora_r"] if best["lora_r"] in (4, 8) else None)


def test_a_warm_start_from_an_unknown_study_is_422_and_creates_nothing(server: LiveServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(ApiError) as caught:
            client.create_study(study_spec("cold", warm_start={"study": "nowhere"}))
        assert caught.value.status_code == 422 and "warm_start.study" in caught.value.message
        assert client.list_studies()["total"] == 0


def test_a_warm_start_shows_the_earlier_trials_to_the_sampler_and_counts_none_of_them(server: LiveServer) -> None:
    def score(params: dict) -> float:  # the earlier study: the higher the learning rate, the better
        return (math.log10(params["learning_rate"]) + 5) / 3

    search = {"sampler": "tpe", "pruner": "none", "seed": 0}
    with Client(server.url) as client:
        client.create_study(study_spec("earlier", baseline=None, budget={"max_trials": 12},
                                         search={**search, "sampler": "random"}))
        while (lease := client.lease("w", {}, "h")) is not None:
            client.complete(lease["trial_id"], value=score(lease["params"]))
        spec = study_spec("warm", baseline=None, warm_start={"study": "earlier", "top_k": 1}, search=search,
                          budget={"max_trials": 7})
        spec["search_space"]["lora_r"] = {"type": "categorical", "choices": [4, 8]}  # 16 and 32 left out
        warm = client.create_study(spec)
        proposed = [client.lease("w", {}, "h") for _ in range(7)]
        for lease in proposed:
            client.complete(lease["trial_id"], value=score(lease["params"]))
        shown = client.get_study(warm["id"])
        first = client.get_trial(proposed[0]["trial_id"])
    assert first["user_attrs"]["warm_start_from"] == "earlier"  # the enqueued best comes first
    sampler = server.backend.runtime(warm["id"]).study.sampler.sampler  # inside BoundedHistorySampler
    assert isinstance(sampler, PriorTrialsSampler) and len(sampler.priors) == 12
    assert all(p.params.get("lora_r", 4) in (4, 8) for p in sampler.priors), "values outside the space dropped"
    study = server.backend.runtime(warm["id"]).study
    assert len(sampler.view(study).get_trials(states=(TrialState.COMPLETE,))) == 12 + 7
    assert len(study.get_trials()) == 7 and shown["trials_used"] == 7 and shown["state"] == "completed"
    # TPE has 12 observations before its first proposal (n_startup_trials 10): it proposes where the earlier
    # study did well (high learning rates) instead of starting from random search.
    sampled = [math.log10(lease["params"]["learning_rate"]) for lease in proposed[1:]]
    assert sum(sampled) / len(sampled) > -2.8, sampled  # -2.3 here; -3.1 without the earlier trials
