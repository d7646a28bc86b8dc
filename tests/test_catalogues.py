"""Catalogues spelled in two places stay in step: the spec's names against the registries that act on them.

Each name is spelled once in `tunefleet.service.spec` (a Literal the spec's fields and JSON schema use);
these tests fail when a registry elsewhere (Optuna builders, worker tasks, metric functions) drifts from it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import numpy as np
import pytest

from tunefleet.service import scheduling, search
from tunefleet.service.spec import (
    MULTI_OBJECTIVE_SAMPLERS,
    PAUSING_PRUNERS,
    TASK_METRICS,
    TRAINING_DEFAULTS,
    TRAINING_PARAMS,
    PrunerName,
    SamplerName,
    SearchSpec,
    SpecError,
    TaskName,
    objectives_of,
    parse_spec_text,
    validate_spec,
)

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
KINDS = {"str": (str,), "int": (int,), "float": (float,)}


def test_every_sampler_and_pruner_name_has_a_builder_and_no_more() -> None:
    assert set(search.SAMPLERS) == set(get_args(SamplerName))
    assert set(search.PRUNERS) == set(get_args(PrunerName))
    assert set(scheduling.POLICIES) == set(PAUSING_PRUNERS) <= set(search.PRUNERS)
    assert set(MULTI_OBJECTIVE_SAMPLERS) <= set(search.SAMPLERS)


def test_the_json_schema_lists_the_registered_choices() -> None:
    properties = SearchSpec.model_json_schema()["properties"]
    assert set(properties["sampler"]["enum"]) == set(search.SAMPLERS)
    assert set(properties["pruner"]["enum"]) == set(search.PRUNERS)


def test_every_task_name_has_metrics() -> None:
    assert set(TASK_METRICS) == set(get_args(TaskName))
    assert all("loss" in metrics for metrics in TASK_METRICS.values())  # the Trainer's evaluation loss


def test_every_training_default_has_the_kind_of_its_parameter() -> None:
    assert set(TRAINING_DEFAULTS) == set(TRAINING_PARAMS)
    for name, default in TRAINING_DEFAULTS.items():
        if default is None:  # resolved by the worker (see tunefleet.workers.training.resolve_config)
            continue
        assert isinstance(default, KINDS[TRAINING_PARAMS[name]]) and not isinstance(default, bool), name


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_workers_read_the_objectives_the_server_validated(path: Path) -> None:
    data = parse_spec_text(path.read_text())
    spec = validate_spec(data)
    assert objectives_of(data) == [(o.metric, o.direction) for o in spec.objectives]


def test_objectives_of_fills_the_default_direction_and_refuses_a_malformed_objective() -> None:
    assert objectives_of({"objective": {"metric": "accuracy"}}) == [("accuracy", "maximize")]
    # Only the objective is read: the rest of a spec is the server's to check.
    multi = {"objective": [{"metric": "accuracy"}, {"metric": "loss", "direction": "minimize"}], "task": "x"}
    assert objectives_of(multi) == [("accuracy", "maximize"), ("loss", "minimize")]
    for bad in ({}, {"objective": {"metric": "accuracy", "direction": "up"}}):
        with pytest.raises(SpecError, match="objective"):
            objectives_of(bad)


# -- worker side (needs torch) ---------------------------------------------------------------------------


def test_the_workers_know_every_task_and_their_metrics_are_the_specs() -> None:
    pytest.importorskip("torch")
    from tunefleet.workers.tasks import TASKS

    assert set(TASKS) == set(get_args(TaskName))
    assert all(task.metrics == TASK_METRICS[name] for name, task in TASKS.items())


def test_an_exported_model_card_names_the_model_class_of_every_task() -> None:
    pytest.importorskip("torch")
    from tunefleet.cli.export import AUTO_CLASSES
    from tunefleet.workers.tasks import TASKS

    assert {name: task.auto_class for name, task in TASKS.items()} == AUTO_CLASSES


def test_each_tasks_evaluation_produces_its_metrics() -> None:
    """The metric functions (workers/evaluation.py) spell the names again: with the Trainer's loss, the spec's."""
    pytest.importorskip("torch")
    from tunefleet.workers.evaluation import attribute_metrics, exact_match
    from tunefleet.workers.tasks import TASKS

    ids = np.array([0, 1, 2, 0])
    sequences = SimpleNamespace(predictions=ids % 2, label_ids=ids % 2)  # argmax ids, as the Trainer passes them
    tags = SimpleNamespace(predictions=ids[None, :], label_ids=ids[None, :])
    computed = {
        "sequence-classification": TASKS["sequence-classification"].compute_metrics(["a", "b"])(sequences),
        "token-classification": TASKS["token-classification"].compute_metrics(["O", "B-X", "I-X"])(tags),
        # causal-lm scores generated answers: its generation_metrics returns attribute_metrics.
        "causal-lm": attribute_metrics([{"color": "red"}], [{"color": "red"}]),
        # sft scores generated text; a user's scorer adds "score", which the spec allows only with one.
        "sft": {"exact_match": exact_match(["red"], ["red"])},
    }
    assert {name: set(metrics) for name, metrics in computed.items()} == {
        name: set(metrics) - {"loss"} for name, metrics in TASK_METRICS.items()}


def test_the_trainers_resolved_config_gives_every_parameter() -> None:
    pytest.importorskip("torch")
    from tunefleet.workers.training import DEFAULTS, resolve_config

    assert DEFAULTS is TRAINING_DEFAULTS
    config = resolve_config({"seed": 3}, {})
    assert set(config) == set(TRAINING_PARAMS)
    assert config["seed"] == 3 and config["lora_alpha"] == 2 * config["lora_r"]


def test_the_client_and_the_server_name_the_lease_token_header_alike() -> None:
    from tunefleet.service import auth, client

    assert client.LEASE_TOKEN_HEADER == auth.LEASE_TOKEN_HEADER


def test_qmc_draws_a_scrambled_design_of_its_own_for_each_seed() -> None:
    import optuna

    from tunefleet.service.search import build_sampler
    from tunefleet.service.spec import StudySpec

    def first_points(seed: int, options: dict[str, object]) -> list[float]:
        spec = StudySpec.model_validate({
            "name": "q", "model": "m", "task": "sequence-classification", "data": {"train": "t.jsonl"},
            "objective": {"metric": "accuracy", "direction": "maximize"},
            "search_space": {"x": {"type": "float", "low": 0.0, "high": 1.0},
                             "k": {"type": "categorical", "choices": ["a", "b", "c", "d"]}},
            "search": {"sampler": "qmc", "pruner": "none", "seed": seed, "sampler_options": options},
        })
        sampler = build_sampler(spec)
        assert isinstance(sampler, optuna.samplers.QMCSampler)
        study = optuna.create_study(sampler=sampler, direction="maximize")
        out = []
        for _ in range(8):
            trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0),
                               "k": optuna.distributions.CategoricalDistribution(["a", "b", "c", "d"])})
            study.tell(trial, 0.0)
            out.append(trial.params["x"])
        return out

    assert first_points(0, {}) != first_points(1, {}), "scrambled: each seed its own design"
    assert first_points(0, {}) == first_points(0, {}), "reproducible from the seed"
    # Optuna draws the very first trial with its independent (random) sampler, then follows the sequence.
    assert first_points(0, {"scramble": False})[1:] == first_points(1, {"scramble": False})[1:], "an option wins"
