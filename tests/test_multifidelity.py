"""The multi-fidelity samplers (`search.sampler: mf-tpe`, `mf-gp`) on small in-memory studies: which rung they
model, what they see of trials in every state (and with `view: predicted`), that their proposals follow the
low-rung signal, and their spec wiring."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from tunefleet.service.freeze_thaw import predicted_finals
from tunefleet.service.multifidelity import (
    MultiFidelityGPSampler,
    MultiFidelitySampler,
    MultiFidelityTPESampler,
    rung_observations,
)
from tunefleet.service.search import build_sampler, search_problems
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


@pytest.mark.parametrize("kind", [MultiFidelityTPESampler, MultiFidelityGPSampler])
def test_proposals_follow_the_low_rung_signal_before_any_trial_finishes(kind: type[MultiFidelitySampler]) -> None:
    # Every trial is stopped at 20% (or 60%): plain TPE would sample at random forever; mf-tpe and mf-gp model
    # rung 20, then 60 once it has enough values, and move towards the best region (x near 0.8).
    if kind is MultiFidelityGPSampler:
        pytest.importorskip("torch")
    sampler = kind([20, 60, 100], min_points=4, seed=0)
    study = _study(sampler, [])
    proposals = []
    for i in range(40 if kind is MultiFidelityTPESampler else 25):
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


def test_the_predicted_view_puts_every_reported_trial_on_the_finals_scale() -> None:
    sampler = MultiFidelityTPESampler([20, 60, 100], min_points=2, seed=0, view="predicted")
    trials = [
        _trial(0.1, {20: 0.5, 60: 0.6, 100: 0.7}, TrialState.COMPLETE, value=0.72),
        _trial(0.2, {20: 0.3, 60: 0.5, 100: 0.6}, TrialState.COMPLETE, value=0.61),
        _trial(0.3, {20: 0.6}, TrialState.RUNNING, paused_at=20),  # paused: predicted from 20%
        _trial(0.4, {20: 0.2, 60: 0.55}),                          # pruned at 60: predicted from 60%
        _trial(0.5, {20: 0.9}, TrialState.FAIL),                    # failed: left out
        _trial(0.6, {}, TrialState.RUNNING),                        # no report yet: in flight
    ]
    study = _study(sampler, trials)
    study.ask(X)
    view = sampler._view
    assert view is not None and view.rung == 100
    seen = {t.params.get("x"): t.value for t in view.study.trials if t.state == TrialState.COMPLETE}
    predicted = predicted_finals(study.trials, [20, 60, 100], maximize=True)
    assert seen[0.1] == 0.72 and seen[0.2] == 0.61, "a completed trial counts with its final"
    assert set(seen) == {0.1, 0.2, 0.3, 0.4}
    by_x = {t.params["x"]: t._trial_id for t in study.trials if "x" in t.params}
    assert seen[0.3] == pytest.approx(predicted[by_x[0.3]]) and seen[0.4] == pytest.approx(predicted[by_x[0.4]])
    assert seen[0.3] != 0.6, "the model's prediction, not the raw 20% value"
    assert [t.params.get("x") for t in view.study.trials if t.state == TrialState.RUNNING] == [0.6, None]


def test_predicted_finals_are_in_the_studys_units_whichever_its_direction() -> None:
    trials = _study(optuna.samplers.RandomSampler(), [
        _trial(0.1, {20: 0.5, 100: 0.9}, TrialState.COMPLETE, value=0.9),
        _trial(0.2, {20: 0.3, 100: 0.8}, TrialState.COMPLETE, value=0.8),
        _trial(0.3, {20: 0.1, 100: 0.4}, TrialState.COMPLETE, value=0.4),
        _trial(0.4, {20: 0.7}, TrialState.RUNNING, paused_at=20)]).trials
    up = predicted_finals(trials, [20, 100], maximize=True)
    down = predicted_finals(trials, [20, 100], maximize=False)
    paused = trials[-1]._trial_id
    assert up[trials[0]._trial_id] == down[trials[0]._trial_id] == 0.9, "a final is a final"
    assert up[paused] == pytest.approx(down[paused]), "a linear fit turned upside down is the same fit"
    assert up[paused] > 0.8, "completed trials gained 0.3-0.5 after 20%: the prediction gains too, not 0.7 as is"


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


def _spec(search: dict[str, Any], **more_params: dict[str, Any]) -> StudySpec:
    """A study spec searching learning_rate and lora_r (plus `more_params`) with this search section."""
    return StudySpec.model_validate({
        "name": "mf", "model": "m", "task": "sequence-classification", "data": {"train": "t.jsonl"},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                         "lora_r": {"type": "categorical", "choices": [4, 8]}, **more_params},
        "search": search,
    })


def test_the_spec_builds_it_with_bohbs_minimum_of_d_plus_one_points() -> None:
    spec = _spec({"sampler": "mf-tpe", "pruner": "asha", "n_startup_trials": 2, "seed": 3},
                 weight_decay={"type": "float", "low": 0.0, "high": 0.1})
    sampler = build_sampler(spec)
    assert isinstance(sampler, MultiFidelityTPESampler)
    assert sampler.min_points == 4 and sampler.rungs == [20, 60, 100]
    with pytest.raises(TypeError):
        build_sampler(spec.model_copy(update={"search": spec.search.model_copy(
            update={"sampler_options": {"no_such_option": 1}})}))


def test_the_spec_builds_mf_gp_and_names_a_bad_view_in_a_4xx_problem() -> None:
    spec = _spec({"sampler": "mf-gp", "pruner": "freeze-thaw", "seed": 3, "sampler_options": {"view": "predicted"}})
    sampler = build_sampler(spec)
    assert isinstance(sampler, MultiFidelityGPSampler)
    assert sampler.min_points == 5 and sampler.view == "predicted", "n_startup_trials (5) over d + 1 (3)"
    bad = spec.model_copy(update={"search": spec.search.model_copy(update={"sampler_options": {"view": "final"}})})
    [(field, message)] = search_problems(bad)
    assert field == ("search", "sampler_options") and "view must be one of rung, predicted" in message


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
