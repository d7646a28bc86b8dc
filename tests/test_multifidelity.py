"""The multi-fidelity TPE sampler (`search.sampler: mf-tpe`) on small in-memory studies: which rung it models,
what it sees of trials in every state, that its proposals follow the low-rung signal, and its spec wiring."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from tunefleet.service.multifidelity import MultiFidelityTPESampler, rung_observations
from tunefleet.service.search import build_sampler
from tunefleet.service.spec import StudySpec
from tunefleet.service.storage import one_thread_for_gp

X = {"x": FloatDistribution(0.0, 1.0)}


def _trial(x: float, curve: dict[int, float], state: TrialState = TrialState.PRUNED,
           value: float | None = None, **attrs: Any) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(params={"x": x}, distributions=X, state=state, value=value,
                                     intermediate_values=curve, user_attrs=attrs)


def _study(sampler: optuna.samplers.BaseSampler, trials: list[optuna.trial.FrozenTrial],
           pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.add_trials(trials)
    return study


def test_the_model_uses_the_highest_rung_with_enough_observations_from_trials_in_every_state() -> None:
    sampler = MultiFidelityTPESampler([20, 60, 100], min_points=3, seed=0)
    trials = [
        _trial(0.1, {20: 0.5, 60: 0.6}),                                   # pruned at 60
        _trial(0.2, {20: 0.4, 60: 0.7}, TrialState.RUNNING, paused_at=60),  # paused at 60
        _trial(0.3, {20: 0.6, 60: 0.8}, TrialState.RUNNING),               # running past 60
        _trial(0.4, {20: 0.9}, TrialState.FAIL),                            # failed: not an observation
        _trial(0.5, {20: 0.3, 60: 0.5, 100: 0.6}, TrialState.COMPLETE, value=0.65),
    ]
    assert sampler.rung_for(trials) == 60  # 4 values at 60; only 1 at 100
    assert [v for _, v in rung_observations(trials, 100, 100)] == [0.65], "the final value, not the last report"
    assert sampler.rung_for(trials[:2]) == 20, "too few anywhere: the lowest rung (TPE samples at random there)"


def test_the_view_holds_observations_at_the_rung_trials_in_flight_and_the_asking_trial() -> None:
    sampler = MultiFidelityTPESampler([20, 100], min_points=2, seed=0)
    study = _study(sampler, [
        _trial(0.1, {20: 0.5}),
        _trial(0.2, {20: 0.7}, TrialState.RUNNING, paused_at=20),  # paused: an observation, not in flight
        _trial(0.3, {}, TrialState.RUNNING),                         # in flight: a constant-liar point
    ])
    asked = study.ask(X)
    view = sampler._view
    assert view is not None and view.rung == 20
    states = [(t.state.name, t.params.get("x"), t.value) for t in view.study.trials]
    assert states == [("COMPLETE", 0.1, 0.5), ("COMPLETE", 0.2, 0.7), ("RUNNING", 0.3, None),
                      ("RUNNING", None, None)], "the asking trial last, still without parameters"
    assert 0 <= asked.params["x"] <= 1


def test_proposals_follow_the_low_rung_signal_before_any_trial_finishes() -> None:
    # Every trial is stopped at 20% (or 60%): plain TPE would sample at random forever; mf-tpe models rung 20,
    # then 60 once it has enough values, and moves towards the best region (x near 0.8).
    sampler = MultiFidelityTPESampler([20, 60, 100], min_points=4, seed=0)
    study = _study(sampler, [])
    proposals = []
    for i in range(40):
        trial = study.ask(X)
        x = trial.params["x"]
        trial.report(1 - abs(x - 0.8), 20)
        if i % 3 == 0:
            trial.report(1 - abs(x - 0.8), 60)
        study.tell(trial, state=TrialState.PRUNED)
        proposals.append(x)
    late = sorted(abs(x - 0.8) for x in proposals[-15:])
    assert late[len(late) // 2] < 0.15, proposals
    assert sampler._view is not None and sampler._view.rung == 60


def test_proposals_are_reproducible_from_the_seed() -> None:
    history = [_trial(i / 10, {20: 1 - abs(i / 10 - 0.3)}) for i in range(10)]
    first = [_study(MultiFidelityTPESampler([20, 100], min_points=3, seed=7), history).ask(X).params["x"]
             for _ in range(2)]
    assert first[0] == first[1]


def test_under_hyperband_the_model_sees_every_brackets_trials() -> None:
    sampler = MultiFidelityTPESampler([20, 60, 100], min_points=2, seed=0)
    pruner = optuna.pruners.HyperbandPruner(min_resource=20, max_resource=100, reduction_factor=3)
    study = _study(sampler, [_trial(i / 12, {20: i / 12}) for i in range(12)], pruner)
    study.ask(X)
    assert sampler._view is not None
    assert sum(t.state == TrialState.COMPLETE for t in sampler._view.study.trials) == 12


def test_the_spec_builds_it_with_bohbs_minimum_of_d_plus_one_points() -> None:
    spec = StudySpec.model_validate({
        "name": "mf", "model": "m", "task": "sequence-classification", "data": {"train": "t.jsonl"},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                         "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
                         "lora_r": {"type": "categorical", "choices": [4, 8]}},
        "search": {"sampler": "mf-tpe", "pruner": "asha", "n_startup_trials": 2, "seed": 3},
    })
    sampler = build_sampler(spec)
    assert isinstance(sampler, MultiFidelityTPESampler)
    assert sampler.min_points == 4 and sampler.rungs == [20, 60, 100]
    with pytest.raises(TypeError):
        build_sampler(spec.model_copy(update={"search": spec.search.model_copy(
            update={"sampler_options": {"no_such_option": 1}})}))


def test_a_gp_ask_runs_with_one_torch_thread_and_restores_the_setting() -> None:
    torch = pytest.importorskip("torch")
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread_for_gp():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
