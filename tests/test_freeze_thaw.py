"""Cost-aware freeze-thaw (`search.pruner: freeze-thaw`): the learning-curve and cost models, the decisions on
small hand-made studies, and a whole study served by simulated workers through the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from tests.conftest import LiveServer, study_spec
from tunefleet.service.client import Client
from tunefleet.service.freeze_thaw import CostModel, FreezeThaw, expected_improvement
from tunefleet.service.scheduling import PausedTrial, policy_for
from tunefleet.service.spec import StudySpec
from tunefleet.service.storage import trial_storage_id
from tunefleet.workers.simulated import run_simulated_workers

RUNGS = [20, 60, 100]
SPACE = {"size": CategoricalDistribution([50, 400]), "lr": FloatDistribution(1e-5, 1e-2, log=True)}


def _trial(curve: dict[int, float], final: float | None = None, paused_at: int | None = None,
           params: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> FrozenTrial:
    attrs: dict[str, Any] = {}
    if paused_at is not None:
        attrs["paused_at"] = paused_at
    if extra is not None:
        attrs["extra"] = extra
    params = params or {"size": 400, "lr": 1e-3}
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE if final is not None else TrialState.RUNNING, value=final,
        intermediate_values=curve, params=params, distributions=SPACE, user_attrs=attrs)


def _study(trials: list[FrozenTrial], direction: str = "maximize") -> list[FrozenTrial]:
    study = optuna.create_study(direction=direction)
    for t in trials:
        study.add_trial(t)
    return study.get_trials()


def _ids(trials: list[FrozenTrial]) -> list[int]:
    return [trial_storage_id(t) for t in trials]


def test_expected_improvement_grows_with_the_mean_and_the_uncertainty() -> None:
    low, p_low = expected_improvement(0.5, 0.1, 0.8)
    high, p_high = expected_improvement(0.7, 0.1, 0.8)
    wide, _ = expected_improvement(0.5, 0.3, 0.8)
    assert 0 < low < high and low < wide and 0 < p_low < p_high < 0.5
    assert expected_improvement(0.9, 1e-12, 0.8)[0] == pytest.approx(0.1)


def test_the_first_trials_pause_at_the_first_rung_until_reduction_factor_have_reported() -> None:
    policy = FreezeThaw(RUNGS, reduction_factor=3, maximize=True)
    trials = _study([_trial({20: 0.9})])
    assert policy.answer(trials, _ids(trials)[0], 20) == "pause", "alone at the rung: nothing to compare with"
    assert policy.next_resume(trials, [PausedTrial(_ids(trials)[0], 20)], can_start_new=True,
                              any_active=False) is None, "new configurations first while warming up"
    assert policy.answer(trials, _ids(trials)[0], 100) == "continue", "the last rung is the end of training"


def test_the_best_trial_goes_on_at_once_once_warmed_up_so_the_first_completion_comes_early() -> None:
    policy = FreezeThaw(RUNGS, reduction_factor=3, maximize=True)
    trials = _study([_trial({20: 0.35}, paused_at=20), _trial({20: 0.4}, paused_at=20), _trial({20: 0.8})])
    ids = _ids(trials)
    assert policy.answer(trials, ids[2], 20) == "continue", "the best value so far: worth more than anything"
    trials = _study([_trial({20: 0.8}, paused_at=20), _trial({20: 0.4}, paused_at=20), _trial({20: 0.35})])
    ids = _ids(trials)
    assert policy.answer(trials, ids[2], 20) == "pause", "the best paused trial is worth more"
    assert policy.next_resume(trials, [PausedTrial(ids[0], 20), PausedTrial(ids[1], 20)], can_start_new=True,
                              any_active=True) == ids[0]


def test_a_late_bloomer_is_resumed_when_completed_trials_show_its_kind_ends_high() -> None:
    """The completed trials went from ~0.5 at 20% to ~0.9: a paused 0.55 is worth more than a new draw
    from a study whose other trials stay near 0.3, although it ranks low among the 20% values."""
    policy = FreezeThaw(RUNGS, reduction_factor=3, maximize=True)
    done = [_trial({20: v, 60: f - 0.05, 100: f}, final=f) for v, f in ((0.5, 0.88), (0.6, 0.92), (0.45, 0.85))]
    flat = [_trial({20: v}, paused_at=20) for v in (0.3, 0.31, 0.29, 0.3, 0.32, 0.3, 0.31)]
    tops = [_trial({20: v}, paused_at=20) for v in (0.95, 0.96)]  # fast starters that have nowhere to go
    bloomer = _trial({20: 0.55}, paused_at=20)
    trials = _study(done + flat + tops + [bloomer])
    ids = _ids(trials)
    paused = [PausedTrial(i, 20) for i in ids[3:]]
    assert policy.next_resume(trials, paused, can_start_new=True, any_active=False) in (ids[-1], *ids[-3:-1])
    # Among 20% values the bloomer is below the fast starters; without them it is the one resumed.
    trials = _study(done + flat + [bloomer])
    ids = _ids(trials)
    assert policy.next_resume(trials, [PausedTrial(i, 20) for i in ids[3:]], can_start_new=True,
                              any_active=False) == ids[-1]


def test_a_paused_trial_with_no_chance_is_left_for_a_new_configuration_and_the_end_resumes_nothing() -> None:
    policy = FreezeThaw(RUNGS, reduction_factor=3, maximize=True)
    done = [_trial({20: v, 60: f, 100: f}, final=f) for v, f in ((0.8, 0.95), (0.7, 0.9), (0.3, 0.31))]
    hopeless = _trial({20: 0.25, 60: 0.26}, paused_at=60)
    trials = _study(done + [_trial({20: 0.9, 60: 0.93})] + [hopeless])
    ids = _ids(trials)
    assert policy.next_resume(trials, [PausedTrial(ids[-1], 60)], can_start_new=True, any_active=True) is None
    assert policy.next_resume(trials, [PausedTrial(ids[-1], 60)], can_start_new=False, any_active=False) is None, \
        "budget spent, a tuned trial completed: maybe_complete prunes it"


def test_when_nothing_completed_and_nothing_else_can_run_the_best_paused_trial_is_resumed() -> None:
    policy = FreezeThaw(RUNGS, reduction_factor=3, maximize=False)  # minimize: lower is better
    trials = _study([_trial({20: 0.5}, paused_at=20), _trial({20: 0.2}, paused_at=20)], direction="minimize")
    ids = _ids(trials)
    paused = [PausedTrial(ids[0], 20), PausedTrial(ids[1], 20)]
    assert policy.next_resume(trials, paused, can_start_new=True, any_active=False) is None, "new trials first"
    assert policy.next_resume(trials, paused, can_start_new=False, any_active=False) == ids[1]


def test_cost_is_percent_until_measured_then_cheap_configurations_cost_less() -> None:
    unmeasured = _study([_trial({20: 0.3}, params={"size": 50, "lr": 1e-3}), _trial({20: 0.5})])
    assert {CostModel(unmeasured).cost(t) for t in unmeasured} == {1.0}
    trials = _study([
        _trial({20: 0.3, 100: 0.3}, final=0.3, params={"size": 50, "lr": 1e-3}, extra={"total_steps": 8}),
        _trial({20: 0.8, 100: 0.9}, final=0.9, params={"size": 400, "lr": 1e-3}, extra={"total_steps": 50}),
        _trial({20: 0.3}, params={"size": 50, "lr": 3e-4}),
        _trial({20: 0.7}, params={"size": 400, "lr": 3e-4}),
    ])
    costs = CostModel(trials)
    assert costs.unit == "total_steps"
    assert [costs.cost(t) for t in trials[:2]] == [8.0, 50.0], "measured where completed"
    assert costs.cost(trials[2]) < 20 < costs.cost(trials[3]), "predicted from the parameters elsewhere"
    seconds = _study([_trial({100: 0.5}, final=0.5, extra={"total_steps": 50, "train_seconds": 120.0})])
    assert CostModel(seconds).unit == "train_seconds", "GPU time is the real cost where workers measure it"


def test_a_cheap_trial_is_preferred_to_an_equally_promising_expensive_one() -> None:
    policy = FreezeThaw(RUNGS, reduction_factor=3, maximize=True)
    done = [
        _trial({20: 0.5, 60: 0.8, 100: 0.85}, final=0.85, params={"size": 50, "lr": 1e-3}, extra={"total_steps": 8}),
        _trial({20: 0.6, 60: 0.8, 100: 0.9}, final=0.9, params={"size": 400, "lr": 1e-3}, extra={"total_steps": 50}),
        _trial({20: 0.3, 60: 0.3, 100: 0.3}, final=0.3, params={"size": 400, "lr": 1e-5}, extra={"total_steps": 50}),
    ]
    cheap = _trial({20: 0.62}, paused_at=20, params={"size": 50, "lr": 2e-3})
    dear = _trial({20: 0.62}, paused_at=20, params={"size": 400, "lr": 2e-3})
    trials = _study(done + [dear, cheap])
    ids = _ids(trials)
    assert policy.next_resume(trials, [PausedTrial(ids[3], 20), PausedTrial(ids[4], 20)], can_start_new=False,
                              any_active=True) == ids[4]


def test_policy_for_builds_freeze_thaw_from_the_spec() -> None:
    spec = StudySpec.model_validate(study_spec("ft", search={"pruner": "freeze-thaw"}))
    assert isinstance(policy_for(spec), FreezeThaw)


def test_simulated_workers_run_a_freeze_thaw_study_to_completion(server: LiveServer, tmp_path: Path) -> None:
    spec = study_spec("ft-sim", baseline=None, budget={"max_trials": 16},
                      search={"sampler": "random", "pruner": "freeze-thaw", "min_resource": 0.2,
                              "reduction_factor": 3, "seed": 0})
    spec["search_space"] = {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                            "method": {"type": "categorical", "choices": ["lora", "full"]}}  # upload and node
    with Client(server.url) as client:
        study = client.create_study(spec)
        codes = run_simulated_workers(server.url, None, 3, timeout=240, workdir=tmp_path, seconds_per_rung=0.05)
        assert codes == [0, 0, 0]
        shown = client.get_study(study["id"])
        trials = client.list_trials(study["id"], limit=100)["items"]
    assert shown["state"] == "completed" and len(trials) == 16
    assert {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}, "nothing failed, nothing left paused"
    assert any(t["state"] == "COMPLETE" for t in trials)
    used = sum(max(map(int, t["intermediate_values"])) for t in trials)
    assert used < 16 * 100, f"pausing trains less than every trial to the end ({used})"
