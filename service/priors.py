"""Warm starts that reach the sampler: an earlier study's completed trials, shown to this study's sampler as if
they were its own.

A spec's `warm_start: {study, top_k}` enqueues the earlier study's `top_k` best configurations (see
`studies._warm_start_configurations`). That alone tells a model-based sampler (TPE, GP) nothing about the
rest of the earlier study: it starts from random search again. `PriorTrialsSampler` wraps the sampler so that,
while it proposes, the study it reads lists the earlier study's completed (feasible) trials before its own.
Only the sampler sees them: they are not trials of this study, so the budget, the views, the best trial, the
pruner and optuna-dashboard never count them.

The study the wrapped sampler gets is a shallow copy whose `_get_trials`/`get_trials` add the priors; the
runtime's own `Study` object is never patched, so other threads reading it (views, the reaper) see only the
study's trials. Each prior keeps the parameters the new search space accepts (a value outside a new range
or a dropped choice is left out, as TPE does for a parameter a trial never suggested).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import optuna
from optuna import distributions
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

__all__ = ["PriorTrialsSampler", "prior_trials"]


def prior_trials(trials: Sequence[FrozenTrial], space: Mapping[str, distributions.BaseDistribution]
                 ) -> list[FrozenTrial]:
    """The completed trials of an earlier study as trials of a study searching `space`: parameters outside it
    dropped, trials left with none or without a finite value skipped. Numbered -1, -2, ... (they are no
    trial of this study; a sampler reads their parameters and values)."""
    out: list[FrozenTrial] = []
    for t in trials:
        if t.state != TrialState.COMPLETE or t.value is None or not math.isfinite(t.value):
            continue
        params, dists = {}, {}
        for name, value in t.params.items():
            dist = space.get(name)
            if dist is None or not _contains(dist, value):
                continue
            params[name], dists[name] = value, dist
        if not params:
            continue
        prior = optuna.trial.create_trial(params=params, distributions=dists, value=t.value,
                                          user_attrs={"warm_start_trial": t.number})
        prior.number = prior._trial_id = -(len(out) + 1)
        out.append(prior)
    return out


def _contains(dist: distributions.BaseDistribution, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


class PriorTrialsSampler(BaseSampler):
    """A sampler that also reads an earlier study's trials (`load_priors()`, called once, at the first
    proposal); every other call goes to the wrapped sampler unchanged."""

    def __init__(self, sampler: BaseSampler, load_priors: Callable[[], list[FrozenTrial]]):
        self.sampler = sampler
        self._load_priors = load_priors
        self._priors: list[FrozenTrial] | None = None

    def __str__(self) -> str:
        return f"PriorTrialsSampler({self.sampler})"

    @property
    def priors(self) -> list[FrozenTrial]:
        if self._priors is None:
            self._priors = self._load_priors()
        return self._priors

    def view(self, study: Study) -> Study:
        """`study` as the wrapped sampler sees it: the priors listed before the study's own completed trials."""
        priors, own = self.priors, study._get_trials
        if not priors:
            return study

        def get_trials(deepcopy: bool = True, states: Container[TrialState] | None = None,
                       use_cache: bool = False) -> list[FrozenTrial]:
            trials = own(deepcopy=deepcopy, states=states, use_cache=use_cache)
            if states is not None and TrialState.COMPLETE not in states:
                return trials
            return [*(copy.deepcopy(priors) if deepcopy else priors), *trials]

        seen = copy.copy(study)
        seen._get_trials = get_trials  # type: ignore[method-assign]
        seen.get_trials = lambda deepcopy=True, states=None: get_trials(deepcopy, states)  # type: ignore[method-assign]
        return seen

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.sampler.infer_relative_search_space(self.view(study), trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.sampler.sample_relative(self.view(study), trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: distributions.BaseDistribution) -> Any:
        return self.sampler.sample_independent(self.view(study), trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(self.view(study), trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
