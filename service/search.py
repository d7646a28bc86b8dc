"""Samplers and pruners by name, and the mapping from a study spec to Optuna objects.

One registry entry per algorithm: adding a sampler is one function, one line here and its name in
`tunefleet.service.spec.SamplerName` (the spec's choices; tests/test_catalogues.py checks the two agree).
Heavy imports (GP needs torch) happen only when that algorithm is used.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from tunefleet.service.multifidelity import MultiFidelityGPSampler, MultiFidelityTPESampler
from tunefleet.service.spec import CategoricalParam, FloatParam, IntParam, PrunerName, SamplerName, StudySpec

__all__ = ["GP_SAMPLERS", "PRUNERS", "SAMPLERS", "build_pruner", "build_sampler", "distributions", "search_problems"]


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every searched parameter, in spec order."""
    out: dict[str, BaseDistribution] = {}
    for name, p in spec.search_space.items():
        if isinstance(p, FloatParam):
            out[name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            out[name] = IntDistribution(p.low, p.high, log=p.log, step=p.step)
        else:
            out[name] = CategoricalDistribution(p.choices)
    return out


def _grid(spec: StudySpec) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for name, p in spec.search_space.items():
        if isinstance(p, CategoricalParam):
            grid[name] = list(p.choices)
        elif isinstance(p, IntParam):
            grid[name] = list(range(p.low, p.high + 1, p.step))
        else:
            assert p.step is not None  # the spec requires a step for grid search
            n = int(round((p.high - p.low) / p.step))
            grid[name] = [p.low + i * p.step for i in range(n + 1)]
    return grid


def _tpe(spec: StudySpec) -> optuna.samplers.BaseSampler:
    s = spec.search
    return optuna.samplers.TPESampler(
        seed=s.seed, multivariate=s.multivariate, constant_liar=s.constant_liar,
        n_startup_trials=s.n_startup_trials, **s.sampler_options,
    )


def _mf_min_points(spec: StudySpec) -> int:
    # BOHB's minimum for a model: d + 1 observations at a rung, d the number of searched parameters.
    return max(spec.search.n_startup_trials, len(spec.search_space) + 1)


def _mf_tpe(spec: StudySpec) -> optuna.samplers.BaseSampler:
    s = spec.search
    return MultiFidelityTPESampler(spec.rungs(), min_points=_mf_min_points(spec), seed=s.seed,
                                   multivariate=s.multivariate, constant_liar=s.constant_liar, **s.sampler_options)


def _mf_gp(spec: StudySpec) -> optuna.samplers.BaseSampler:
    # The same view as mf-tpe, modelled by a GP.
    return MultiFidelityGPSampler(spec.rungs(), min_points=_mf_min_points(spec), seed=spec.search.seed,
                                  **spec.search.sampler_options)


def _gp(spec: StudySpec) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=spec.search.seed, n_startup_trials=spec.search.n_startup_trials,
                                     **spec.search.sampler_options)


def _qmc(spec: StudySpec) -> optuna.samplers.BaseSampler:
    # Sobol points: a space-filling design (each parameter's range, and each categorical's choices, covered
    # evenly from the first few trials on), no model.
    # Scrambled, so that each seed draws its own design (Optuna's default is the one unscrambled sequence).
    # Optuna still marks QMCSampler experimental: the user chose it, the server log need not say so per study.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=spec.search.seed,
                                          **{"scramble": True, **spec.search.sampler_options})


def _random(spec: StudySpec) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=spec.search.seed)


class _ServerGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its one `optimize`-only habit: once the grid is exhausted, its `after_trial` calls
    `study.stop()`, which raises outside `Study.optimize` (the server tells trials from requests). A study here
    ends when its budget is spent, as with any sampler."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: Sequence[float] | None) -> None:
        pass


def _grid_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    return _ServerGridSampler(_grid(spec), seed=spec.search.seed)


def _cmaes(spec: StudySpec) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=spec.search.seed, n_startup_trials=spec.search.n_startup_trials,
                                        **spec.search.sampler_options)


def _nsga2(spec: StudySpec) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=spec.search.seed, **spec.search.sampler_options)


SAMPLERS: dict[SamplerName, Callable[[StudySpec], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "mf-tpe": _mf_tpe,
    "mf-gp": _mf_gp,
    "gp": _gp,
    "random": _random,
    "qmc": _qmc,
    "grid": _grid_sampler,
    "cmaes": _cmaes,
    "nsga2": _nsga2,
}
# Samplers whose asks fit a Gaussian process in torch: one at a time, on one thread (`one_thread_for_gp`).
GP_SAMPLERS: frozenset[SamplerName] = frozenset({"gp", "mf-gp"})
# Python modules a sampler needs beyond Optuna itself, and the install that brings them.
_SAMPLER_NEEDS: dict[SamplerName, tuple[str, str]] = {
    **{name: ("torch", "pip install 'tunefleet[worker]' on the server") for name in GP_SAMPLERS},
    "cmaes": ("cmaes", "pip install cmaes"),
}


def _first_rung(spec: StudySpec) -> int:
    return spec.rungs()[0]


def _hyperband(spec: StudySpec) -> optuna.pruners.BasePruner:
    # Steps are percent of the training budget, so max_resource is always 100 (never "auto", which
    # freezes on the first prune call).
    return optuna.pruners.HyperbandPruner(min_resource=_first_rung(spec), max_resource=100,
                                          reduction_factor=spec.search.reduction_factor, **spec.search.pruner_options)


def _successive_halving(spec: StudySpec) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=_first_rung(spec),
                                                  reduction_factor=spec.search.reduction_factor,
                                                  **spec.search.pruner_options)


def _median(spec: StudySpec) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=spec.search.n_startup_trials,
                                       n_warmup_steps=spec.search.n_warmup_steps, **spec.search.pruner_options)


def _nop(spec: StudySpec) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def _pausing(spec: StudySpec) -> optuna.pruners.BasePruner:
    # Pausing policies (asha, freeze-thaw) answer continue or pause themselves
    # (tunefleet.service.scheduling); Optuna's pruner stays out of the way.
    if spec.search.pruner_options:
        raise ValueError(f"{spec.search.pruner} takes no pruner_options: set min_resource, reduction_factor or rungs")
    return optuna.pruners.NopPruner()


PRUNERS: dict[PrunerName, Callable[[StudySpec], optuna.pruners.BasePruner]] = {
    "hyperband": _hyperband,
    "successive_halving": _successive_halving,
    "median": _median,
    "asha": _pausing,
    "freeze-thaw": _pausing,
    "none": _nop,
}


def build_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    return SAMPLERS[spec.search.sampler](spec)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    return PRUNERS[spec.search.pruner](spec)


def search_problems(spec: StudySpec) -> list[tuple[tuple[str, ...], str]]:
    """Problems only the server can see: missing modules, or options the algorithm rejects."""
    need = _SAMPLER_NEEDS.get(spec.search.sampler)
    if need and importlib.util.find_spec(need[0]) is None:
        return [(("search", "sampler"), f"{spec.search.sampler} needs the {need[0]} module on the server: "
                 f"{need[1]}, or choose another sampler")]
    problems: list[tuple[tuple[str, ...], str]] = []
    for field, build in (("sampler", build_sampler), ("pruner", build_pruner)):
        try:
            build(spec)
        except (TypeError, ValueError) as exc:
            problems.append((("search", f"{field}_options"), f"{getattr(spec.search, field)} rejects these "
                             f"options: {exc}; see Optuna's documentation for its arguments"))
    return problems
