"""Scheduling policies that pause trials at rungs and resume them later: asynchronous successive halving
with promotions (`Asha`, ``search.pruner: asha``) and cost-aware freeze-thaw
(`tunefleet.service.freeze_thaw.FreezeThaw`, ``search.pruner: freeze-thaw``).

A policy answers two questions, both from the whole study (every rung value of every trial):
- a trial reported at a rung: go on (``continue``) or free the worker (``pause``: the trial saves a checkpoint
  and can be promoted later);
- a worker is free: which paused trial, if any, to resume before a new configuration is asked for.

ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020) promotes a trial from
a rung when it is in the top ``1/η`` of every value reported at that rung so far. Asked at report time, a
trial that already ranks there continues at once; the others pause. As more trials reach the rung its cut
moves, and a paused trial that now ranks in the top ``1/η`` is promoted, resumed from its checkpoint by the
next free worker. Unlike Optuna's pruners, nothing is stopped for good on the evidence of the first few
trials: the first trials of a study pause at the first rung until enough peers have reported.

Paused trials are RUNNING in Optuna (their intermediate values are what samplers see) and ``paused`` in
our lease table; see docs/architecture.md, "Paused trials".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from optuna.trial import FrozenTrial, TrialState

from tunefleet.service.spec import PrunerName, ReportAction, StudySpec
from tunefleet.service.storage import trial_storage_id

__all__ = ["Asha", "PausedTrial", "PausingPolicy", "policy_for", "tuned_trial_completed"]


@dataclass(frozen=True)
class PausedTrial:
    trial_id: int
    step: int  # the rung it paused at: its last reported step


class PausingPolicy(Protocol):
    """What `leases` and `studies.maybe_complete` ask a pausing policy (see the module's docstring)."""

    def answer(self, trials: Iterable[FrozenTrial], trial_id: int, step: int) -> ReportAction: ...

    def next_resume(self, trials: Sequence[FrozenTrial], paused: Sequence[PausedTrial], *, can_start_new: bool,
                    any_active: bool) -> int | None: ...


class Asha:
    """Asynchronous successive halving with promotions over `rungs` (percents, ending at 100)."""

    def __init__(self, rungs: Sequence[int], reduction_factor: int, maximize: bool):
        self.rungs = sorted(rungs)
        self.eta = reduction_factor
        self.maximize = maximize

    def answer(self, trials: Iterable[FrozenTrial], trial_id: int, step: int) -> ReportAction:
        """``continue`` when the trial's value at `step` ranks in the top 1/η of the rung's values, or
        `step` is the last rung; ``pause`` otherwise. The trial's own report must already be in `trials`."""
        if step >= self.rungs[-1]:
            return "continue"
        values = _rung_values(trials, step)
        return "continue" if self._promotable(values, trial_id) else "pause"

    def next_resume(self, trials: Sequence[FrozenTrial], paused: Sequence[PausedTrial], *, can_start_new: bool,
                    any_active: bool) -> int | None:
        """The paused trial a free worker should resume, or None (start a new configuration, or wait).

        Promotions go highest rung first, best value first. When the study can start no new trial, nothing
        is training and no tuned trial has completed yet, the best paused trial of the highest rung is
        resumed anyway, so every study ends with a completed trial however small its budget."""
        for step in sorted({p.step for p in paused}, reverse=True):
            values = _rung_values(trials, step)
            ready = [p.trial_id for p in paused if p.step == step and self._promotable(values, p.trial_id)]
            if ready:
                return self._best(ready, values)
        if paused and not can_start_new and not any_active and not tuned_trial_completed(trials):
            top = max(p.step for p in paused)
            values = _rung_values(trials, top)
            return self._best([p.trial_id for p in paused if p.step == top], values)
        return None

    def _promotable(self, values: dict[int, float], trial_id: int) -> bool:
        if trial_id not in values:
            return False
        slots = len(values) // self.eta
        mine = values[trial_id]
        better = sum(1 for v in values.values() if (v > mine if self.maximize else v < mine))
        return better < slots

    def _best(self, trial_ids: list[int], values: dict[int, float]) -> int:
        known = [t for t in trial_ids if t in values] or trial_ids
        sign = -1.0 if self.maximize else 1.0
        return min(known, key=lambda t: (sign * values.get(t, 0.0), t))


def _rung_values(trials: Iterable[FrozenTrial], step: int) -> dict[int, float]:
    """Trial id -> value reported at `step`, over every trial that reached it and did not fail (a failed
    trial's retry reports the same configuration again)."""
    return {trial_storage_id(t): t.intermediate_values[step] for t in trials
            if step in t.intermediate_values and t.state != TrialState.FAIL}


def tuned_trial_completed(trials: Iterable[FrozenTrial]) -> bool:
    """Whether a trial other than the baseline has completed (every study should end with one)."""
    return any(t.state == TrialState.COMPLETE and not t.user_attrs.get("is_baseline") for t in trials)


def _asha(spec: StudySpec) -> PausingPolicy:
    return Asha(spec.rungs(), spec.search.reduction_factor, spec.objectives[0].direction == "maximize")


def _freeze_thaw(spec: StudySpec) -> PausingPolicy:
    from tunefleet.service.freeze_thaw import FreezeThaw  # imports this module: late, to avoid a cycle

    return FreezeThaw(spec.rungs(), spec.search.reduction_factor, spec.objectives[0].direction == "maximize")


# The pruners that pause (spec.PAUSING_PRUNERS; tests/test_catalogues.py pins the two together).
POLICIES: dict[PrunerName, Callable[[StudySpec], PausingPolicy]] = {
    "asha": _asha,
    "freeze-thaw": _freeze_thaw,
}


def policy_for(spec: StudySpec) -> PausingPolicy | None:
    """The study's pausing policy; None when its pruner never pauses (Optuna's pruners)."""
    build = POLICIES.get(spec.search.pruner)
    return build(spec) if build else None
