"""A model of the whole study across fidelities (``search.sampler: mf-tpe`` and ``mf-gp``), after BOHB.

Optuna's TPE learns only from final values (and, under ``HyperbandPruner``, only from the trials of the
asking trial's bracket). With rungs, most trials never reach the end: what the study knows about them is
their values at the lower rungs, which plain TPE throws away.

BOHB (Falkner, Klein and Hutter, "BOHB: Robust and Efficient Hyperparameter Optimization at Scale", ICML
2018, arXiv 1807.01774) fits its TPE model on the observations of the **highest budget that has enough of
them**. Here a budget is a rung (percent of the training budget) and an observation is any trial's value at
that rung, whatever the trial's state: complete, pruned, paused, or still running past it. On each ask the
sampler

1. picks the rung: the highest rung with at least ``min_points`` observations (BOHB's N_min = d + 1, d the
   number of searched parameters, or the spec's ``n_startup_trials`` if larger); while no rung has that
   many, the lowest rung, where the model samples at random (its ``n_startup_trials`` is ``min_points``);
2. builds a view of the study at that rung: an in-memory Optuna study with one COMPLETE trial per
   observation (the trial's parameters and its value at the rung), the trials in flight towards it as
   RUNNING (constant liar keeps parallel proposals apart; a paused trial is not in flight), and the asking
   trial;
3. asks an Optuna sampler on that view, so the model is Optuna's, unchanged: ``TPESampler`` (``mf-tpe``,
   BOHB's) or ``GPSampler`` (``mf-gp``).

With the sampler option ``view: predicted`` step 1-2 differ: every trial with a report is one observation,
at its final where it completed and elsewhere at the final that freeze-thaw's learning-curve model
predicts from its latest report (`tunefleet.service.freeze_thaw.predicted_finals`), so a trial that
completed counts with its final at once and trials stopped at different rungs share one scale.

The view is rebuilt on each ask (O(trials), a few milliseconds for hundreds of trials; a GP fit adds
0.1-1 s); a fresh model seeded from the study's seed and the trial number keeps proposals reproducible
whatever happened to earlier views. Single-objective only (the spec refuses it for several objectives).
docs/search_quality.md measures both models and both views against the other strategies.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, GPSampler, TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tunefleet.service.freeze_thaw import predicted_finals
from tunefleet.service.storage import trial_storage_id, whole_study

VIEWS = ("rung", "predicted")  # what the model is fitted on: one rung's values, or every trial's predicted final

__all__ = ["VIEWS", "MultiFidelityGPSampler", "MultiFidelitySampler", "MultiFidelityTPESampler", "rung_observations"]


def rung_observations(trials: Sequence[FrozenTrial], rung: int, last_rung: int) -> list[tuple[FrozenTrial, float]]:
    """Every trial's value at `rung`: its report there, or its final value at the last rung. Failed trials are
    left out (a retry reports the same configuration again)."""
    out = []
    for t in trials:
        if t.state == TrialState.FAIL:
            continue
        if rung == last_rung and t.state == TrialState.COMPLETE and t.value is not None:
            out.append((t, t.value))
        elif rung in t.intermediate_values:
            out.append((t, t.intermediate_values[rung]))
    return out


@dataclass(frozen=True)
class _View:
    key: tuple[str, int]  # (study name, asking trial's number)
    rung: int
    study: optuna.Study
    trial: FrozenTrial  # the asking trial, as the view holds it
    model: BaseSampler


class MultiFidelitySampler(BaseSampler):
    """An Optuna sampler fitted on the highest rung with at least `min_points` observations (see the module
    docstring); `_inner` makes the model for one view (TPE here, GP in `MultiFidelityGPSampler`).

    `rungs` are the study's rungs in percent (ending at 100). Raises ValueError for an empty `rungs` or
    `min_points` below 1."""

    name = "mf-tpe"

    def __init__(self, rungs: Sequence[int], min_points: int, *, seed: int | None = None, view: str = "rung",
                 **options: Any):
        if not rungs or min_points < 1:
            raise ValueError(f"{self.name} needs the study's rungs and min_points >= 1")
        if view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
        self.rungs = sorted(rungs)
        self.min_points = min_points
        self.view = view
        self._seed = seed
        self._options = options
        self._inner(None)  # options the model rejects fail here, when the study is created
        self._view: _View | None = None

    def _inner(self, seed: int | None) -> BaseSampler:
        raise NotImplementedError

    def rung_for(self, trials: Sequence[FrozenTrial]) -> int:
        """The highest rung with at least `min_points` observations; the lowest rung when none has."""
        for rung in reversed(self.rungs):
            if len(rung_observations(trials, rung, self.rungs[-1])) >= self.min_points:
                return rung
        return self.rungs[0]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        view = self._view_for(study, trial)
        return view.model.infer_relative_search_space(view.study, view.trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        view = self._view_for(study, trial)
        return view.model.sample_relative(view.study, view.trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        view = self._view_for(study, trial)
        return view.model.sample_independent(view.study, view.trial, param_name, param_distribution)

    def _view_for(self, study: optuna.Study, trial: FrozenTrial) -> _View:
        """The view for this ask, built on its first call (an ask makes up to 2 + one per parameter)."""
        study = whole_study(study)  # under HyperbandPruner, every bracket's trials, not only this one's
        key = (study.study_name, trial.number)
        if self._view is None or self._view.key != key:
            self._view = self._build_view(study, trial, key)
        return self._view

    def _build_view(self, study: optuna.Study, trial: FrozenTrial, key: tuple[str, int]) -> _View:
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        if self.view == "predicted":
            rung = self.rungs[-1]
            finals = predicted_finals(others, self.rungs, study.direction == StudyDirection.MAXIMIZE)
            observed = [(t, finals[trial_storage_id(t)]) for t in others if trial_storage_id(t) in finals]
        else:
            rung = self.rung_for(others)
            observed = rung_observations(others, rung, self.rungs[-1])
        seen = {t.number for t, _ in observed}
        view_trials = [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=value)
                       for t, value in observed]
        view_trials += [optuna.trial.create_trial(state=TrialState.RUNNING, params=t.params,
                                                  distributions=t.distributions)
                        for t in others if t.number not in seen and _in_flight(t)]
        view_trials.append(optuna.trial.create_trial(state=TrialState.RUNNING, params=trial.params,
                                                     distributions=trial.distributions))
        seed = None if self._seed is None else (self._seed * 1_000_003 + trial.number) % 2**32
        model = self._inner(seed)
        view = optuna.create_study(direction=study.direction, sampler=model)
        view.add_trials(view_trials)
        return _View(key, rung, view, view.get_trials(deepcopy=False)[-1], model)


class MultiFidelityTPESampler(MultiFidelitySampler):
    """BOHB's model: Optuna's `TPESampler` on the view (`options`: ``multivariate``, ``constant_liar``...)."""

    name = "mf-tpe"

    def _inner(self, seed: int | None) -> BaseSampler:
        return TPESampler(seed=seed, n_startup_trials=self.min_points, **self._options)


class MultiFidelityGPSampler(MultiFidelitySampler):
    """Optuna's `GPSampler` (a Gaussian process with log expected improvement) on the view: with the few
    observations a rung holds early, a GP's length scales pick up a trend along one parameter (more data, a
    larger learning rate) that TPE's density ratio over one or two good points cannot. Needs torch; asks run
    on one thread (`tunefleet.service.storage.one_thread_for_gp`)."""

    name = "mf-gp"

    def _inner(self, seed: int | None) -> BaseSampler:
        return GPSampler(seed=seed, n_startup_trials=self.min_points, **self._options)


def _in_flight(trial: FrozenTrial) -> bool:
    """Running and not paused: it may report at the rung soon. A paused trial moves only if promoted."""
    return trial.state == TrialState.RUNNING and trial.user_attrs.get("paused_at") is None and bool(trial.params)
