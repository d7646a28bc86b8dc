"""Cost-aware freeze-thaw scheduling (``search.pruner: freeze-thaw``): pause and resume trials by expected
improvement per unit of cost.

ASHA (`tunefleet.service.scheduling.Asha`) ranks the values at one rung: the first trials wait paused until
enough peers have reported, and a trial that ranks low at the first rung stays paused however its kind of
configuration tends to end. Freeze-thaw (Swersky, Snoek and Adams, arXiv 1406.3896; DPL, arXiv 2302.00441)
instead asks, whenever there is a choice, which use of the next stretch of compute is worth most:

- a trial reported at a rung: go on (``continue``) or free the worker (``pause``);
- a worker is free: resume a paused trial, or start a new configuration.

Every option is scored the same way (`Option`): the **expected improvement** (EI) of its final value over the
incumbent, divided by its **expected cost**. The pieces:

- **Learning-curve model** (`ConversionModel`), pooled over the study: for each rung r, a linear regression
  of the final value on the value at r, fitted on the study's completed trials (selection on the regressor
  does not bias a regression, so fitting on the promoted trials only is sound). Its prior is "the value at
  r is its own best guess of the final" (two pseudo-observations on the identity line), with a spread that
  grows with the budget still to train (`_prior_spread`). The prediction is a normal distribution: mean from
  the fit, variance from the residuals (plus the prior's, as one pseudo-observation) and the fit's own
  uncertainty. A trial is predicted from its latest rung. A late bloomer at 20% keeps a chance as long as
  the completed trials show that values like its own can still end high.
- **A new configuration** (`_View.new_option`): its final is distributed as the study's trials so far, each
  completed one at its final and each other one as predicted from its latest rung, smoothed by a Gaussian
  kernel of Silverman's bandwidth (without it a new configuration could never beat the best final seen, and
  every running trial would look better than starting anew); its EI is the mean EI over that mixture. The
  sampler's own progress is not credited (conservative for TPE).
- **Cost** (`CostModel`): a trial's full cost is measured where it completed (``extra.train_seconds`` on
  real workers, else ``extra.total_steps``, e.g. in replay), predicted from its parameters for the others (a
  ridge regression of log cost on the encoded parameters of the completed trials: a smaller ``train_size``
  or ``method: lora`` is cheaper where the study measured it), and 1 for every trial (cost = percent of the
  budget) until one has completed.
- **Expected cost of an option**: the stretch to the next rung, plus the rest of the budget times the
  chance that the option beats the incumbent (after the next rung the policy decides again; a trial that
  cannot improve on the incumbent would be paused there). The last stretch to 100% is charged in full.
- **Incumbent**: the best final of a completed trial; before any completion, the best value reported at
  any rung (a partial value is a conservative bar for the final).

Decisions, from the scores: a reporting trial continues unless a paused trial or a new configuration scores
higher (ties continue: pausing costs a checkpoint). A free worker resumes the best-scoring paused trial when
it scores higher than a new configuration, even if the study can start no new trial (a paused trial worth
less than a fresh configuration is not worth the compute; `studies.maybe_complete` then prunes it).

Constants, each with its reason (none is fitted to a benchmark):
- warm-up: while fewer than ``reduction_factor`` trials reported at the first rung, the first trials pause
  there (ASHA's own first slot; the model needs a spread of values to say anything);
- the prior's weight: two pseudo-observations for the line, one for the residual variance (the weakest
  prior that keeps the fit defined with no or one completed trial);
- the prior's spread: the standard deviation of the study's first-rung values times sqrt(remaining budget)
  (the objective's own scale; a random walk's spread grows with the square root of the time left);
- Silverman's bandwidth (1.06 σ n^-1/5) for the new configurations' density: the textbook default for a
  roughly normal sample, no tuning;
- the ridge penalty of the cost model, 1: a choice seen in one completed trial moves halfway to its
  measured cost.

Like ASHA: when the study can start no new trial, nothing is training and no tuned trial has completed, the
paused trial with the best predicted final is resumed anyway, so every study ends with a completed trial.
numpy only (the server imports no torch, and scipy is not needed for a normal distribution).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tunefleet.service.scheduling import PausedTrial, tuned_trial_completed
from tunefleet.service.spec import ReportAction
from tunefleet.service.storage import trial_storage_id

__all__ = ["ConversionModel", "CostModel", "FreezeThaw", "Option", "expected_improvement", "predicted_finals"]

COST_KEYS = ("train_seconds", "total_steps")  # measured cost of a completed trial, best unit first
RIDGE = 1.0  # cost model: one pseudo-observation at the mean cost per parameter coefficient
_TINY = 1e-9  # a spread of exactly zero would make every EI zero; this keeps the arithmetic defined


def expected_improvement(mean: float, std: float, incumbent: float) -> tuple[float, float]:
    """(EI, probability of improvement) of a normal N(mean, std²) over `incumbent`, larger is better."""
    if not math.isfinite(incumbent):
        return max(mean, 0.0), 1.0
    std = max(std, _TINY)
    z = (mean - incumbent) / std
    cdf = 0.5 * math.erfc(-z / math.sqrt(2.0))
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return max((mean - incumbent) * cdf + std * pdf, 0.0), cdf


@dataclass(frozen=True)
class Option:
    """A use of the next stretch of compute: continue or resume `trial_id` (None: a new configuration)."""

    trial_id: int | None
    ei: float
    cost: float
    mean: float  # the predicted final (larger is better)

    @property
    def score(self) -> float:
        """Expected improvement per unit of expected cost."""
        return self.ei / max(self.cost, _TINY)


# ---- the learning-curve model --------------------------------------------------------------------------------

class ConversionModel:
    """Final value given the value at a rung, pooled over the study (one linear fit per rung, with a prior).

    Values are oriented so that larger is better. `spread` is the study's scale (the standard deviation of
    its first-rung values).
    """

    def __init__(self, completed: Sequence[FrozenTrial], values: dict[int, dict[int, float]], finals: dict[int, float],
                 spread: float, last_rung: int):
        self.spread = max(spread, _TINY)
        self.last_rung = last_rung
        self._completed = [trial_storage_id(t) for t in completed]
        self._values, self._finals = values, finals
        self._fits: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    def predict(self, value: float, rung: int) -> tuple[float, float]:
        """(mean, std) of the final value of a trial whose latest value is `value` at `rung`."""
        if rung >= self.last_rung:
            return value, _TINY
        coef, cov, noise = self._fit(rung)
        x = np.array([1.0, value])
        return float(x @ coef), math.sqrt(noise * (1.0 + float(x @ cov @ x)))

    def _fit(self, rung: int) -> tuple[np.ndarray, np.ndarray, float]:
        if rung not in self._fits:
            self._fits[rung] = self._fit_rung(rung)
        return self._fits[rung]

    def _fit_rung(self, rung: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Least squares of final on value at `rung` over completed trials plus two prior points on the
        identity line around the rung's mean value; returns (coefficients, their scaled covariance, noise)."""
        pairs = [(self._values[t][rung], self._finals[t]) for t in self._completed if rung in self._values.get(t, {})]
        at_rung = [v[rung] for v in self._values.values() if rung in v]
        centre = float(np.mean(at_rung)) if at_rung else 0.0
        prior = [(centre - self.spread, centre - self.spread), (centre + self.spread, centre + self.spread)]
        xs = np.array([[1.0, x] for x, _ in pairs + prior])
        ys = np.array([y for _, y in pairs + prior])
        xtx_inv = np.linalg.pinv(xs.T @ xs)  # pinv: defined even when every value is the same
        coef = xtx_inv @ xs.T @ ys
        real = xs[: len(pairs)]
        rss = float(np.sum((ys[: len(pairs)] - real @ coef) ** 2)) if pairs else 0.0
        prior_var = _prior_spread(self.spread, rung, self.last_rung) ** 2
        noise = (rss + prior_var) / (max(len(pairs) - 2, 0) + 1)
        return coef, xtx_inv, noise


def _silverman(values: np.ndarray) -> float:
    """Silverman's rule-of-thumb bandwidth for a Gaussian kernel density of `values` (1.06 σ n^-1/5): a new
    configuration may end between or beyond the finals seen so far, not only exactly on one of them."""
    return 1.06 * float(np.std(values)) * len(values) ** -0.2


def _prior_spread(spread: float, rung: int, last_rung: int) -> float:
    """How far the final may be from the value at `rung` before any trial completed: the study's scale times
    the square root of the share of the budget still to train (a random walk's spread)."""
    return spread * math.sqrt(max(last_rung - rung, 0) / last_rung)


# ---- the cost model ------------------------------------------------------------------------------------------

class CostModel:
    """A trial's full cost in the study's measured unit (train seconds, else optimizer steps), or 1 each
    (cost = percent of the budget) until a completed trial carries a measurement."""

    def __init__(self, trials: Sequence[FrozenTrial]):
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        self.unit = next((k for k in COST_KEYS if any(_measured(t, k) for t in completed)), None)
        self._measured = {trial_storage_id(t): c for t in completed if (c := _measured(t, self.unit)) is not None}
        self._space = _space(trials)
        self._beta: np.ndarray | None = None
        self._centre = np.zeros(0)
        self._mean = 0.0
        if self._measured:
            self._fit([t for t in completed if trial_storage_id(t) in self._measured])

    def cost(self, trial: FrozenTrial) -> float:
        """Measured where the trial completed with a measurement, predicted from its parameters otherwise."""
        known = self._measured.get(trial_storage_id(trial))
        if known is not None:
            return known
        if self._beta is None:
            return math.exp(self._mean) if self._measured else 1.0
        return math.exp(self._mean + float(self._encode(trial) @ self._beta))

    def _fit(self, trials: Sequence[FrozenTrial]) -> None:
        """Ridge regression of log cost on the centred encoded parameters (intercept not penalised)."""
        logs = np.log([self._measured[trial_storage_id(t)] for t in trials])
        self._mean = float(np.mean(logs))
        if not self._space:
            return
        xs = np.array([self._encode(t) for t in trials])
        self._centre = xs.mean(axis=0)
        xs = xs - self._centre
        self._beta = np.linalg.solve(xs.T @ xs + RIDGE * np.eye(xs.shape[1]), xs.T @ (logs - self._mean))

    def _encode(self, trial: FrozenTrial) -> np.ndarray:
        row: list[float] = []
        for name, dist in self._space:
            row.extend(_encode(dist, trial.params.get(name)))
        x = np.array(row)
        return x - self._centre if self._beta is not None else x


def _measured(trial: FrozenTrial, key: str | None) -> float | None:
    extra = trial.user_attrs.get("extra") or {}
    value = extra.get(key) if key and isinstance(extra, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _space(trials: Sequence[FrozenTrial]) -> list[tuple[str, BaseDistribution]]:
    """The searched parameters, in a fixed order (from the first trial that has each)."""
    space: dict[str, BaseDistribution] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            space.setdefault(name, dist)
    return sorted(space.items())


def _encode(dist: BaseDistribution, value: object) -> list[float]:
    """A parameter as features in [0, 1]: one-hot for a categorical, its position in the range (on log scale
    for a log range) for a number; a missing value is the middle (or no choice)."""
    if isinstance(dist, CategoricalDistribution):
        return [1.0 if value == c else 0.0 for c in dist.choices]
    if isinstance(dist, (FloatDistribution, IntDistribution)) and isinstance(value, (int, float)):
        low, high, v = float(dist.low), float(dist.high), float(value)
        if dist.log and low > 0 and v > 0:
            low, high, v = math.log(low), math.log(high), math.log(v)
        return [(v - low) / (high - low) if high > low else 0.5]
    return [0.5]


# ---- the policy ----------------------------------------------------------------------------------------------

class FreezeThaw:
    """Cost-aware freeze-thaw over `rungs` (percents, ending at 100); the interface of `Asha`."""

    def __init__(self, rungs: Sequence[int], reduction_factor: int, maximize: bool):
        self.rungs = sorted(rungs)
        self.warm_up = reduction_factor
        self.sign = 1.0 if maximize else -1.0

    def answer(self, trials: Iterable[FrozenTrial], trial_id: int, step: int) -> ReportAction:
        """``continue`` when going on with `trial_id` from `step` scores at least as high as resuming any
        paused trial and as a new configuration, or `step` is the last rung; ``pause`` otherwise. The trial's
        own report must already be in `trials`."""
        if step >= self.rungs[-1]:
            return "continue"
        view = _View(self, list(trials))
        if view.warming_up:
            return "pause"
        mine = view.trial_option(trial_id, step)
        others = [view.trial_option(t, s) for t, s in view.paused_elsewhere(trial_id)] + [view.new_option()]
        return "continue" if mine.score >= max(o.score for o in others) else "pause"

    def next_resume(self, trials: Sequence[FrozenTrial], paused: Sequence[PausedTrial], *, can_start_new: bool,
                    any_active: bool) -> int | None:
        """The paused trial a free worker should resume, or None (start a new configuration, or wait)."""
        if not paused:
            return None
        view = _View(self, list(trials))
        if view.warming_up and can_start_new:
            return None
        options = [view.trial_option(p.trial_id, p.step) for p in paused]
        best = max(options, key=lambda o: (o.score, o.mean))
        if best.score > view.new_option().score:
            return best.trial_id
        if not can_start_new and not any_active and not tuned_trial_completed(trials):
            return max(options, key=lambda o: o.mean).trial_id
        return None


def predicted_finals(trials: Sequence[FrozenTrial], rungs: Sequence[int], maximize: bool) -> dict[int, float]:
    """Each trial's final as the learning-curve model sees it, by storage id, in the study's own direction:
    its final where it completed, else the predicted mean from its latest reported value. Failed trials and
    trials without a report are left out."""
    policy = FreezeThaw(rungs, 2, maximize)  # the reduction factor only sets the warm-up, unused here
    return {tid: policy.sign * mean for tid, (mean, _) in _View(policy, list(trials)).predictions().items()}


class _View:
    """One snapshot of the study for one decision: values per rung, finals, incumbent, and the models."""

    def __init__(self, policy: FreezeThaw, trials: list[FrozenTrial]):
        self.policy = policy
        live = [t for t in trials if t.state != TrialState.FAIL]
        self.trials = {trial_storage_id(t): t for t in live}
        sign = policy.sign
        self.values = {trial_storage_id(t): {s: sign * v for s, v in t.intermediate_values.items()} for t in live}
        completed = [t for t in live if t.state == TrialState.COMPLETE and t.value is not None]
        self.finals = {trial_storage_id(t): sign * float(t.value) for t in completed if t.value is not None}
        first = [v[policy.rungs[0]] for v in self.values.values() if policy.rungs[0] in v]
        self.warming_up = len(first) < policy.warm_up
        self.incumbent = max(self.finals.values(), default=max(
            (x for v in self.values.values() for x in v.values()), default=-math.inf))
        self.curves = ConversionModel(completed, self.values, self.finals, float(np.std(first)) if first else 0.0,
                                      policy.rungs[-1])
        self.costs = CostModel(live)

    def paused_elsewhere(self, trial_id: int) -> list[tuple[int, int]]:
        """(trial id, rung) of the paused trials other than `trial_id`, from Optuna's `paused_at` attribute."""
        out = []
        for tid, t in self.trials.items():
            step = t.user_attrs.get("paused_at")
            if tid != trial_id and t.state == TrialState.RUNNING and isinstance(step, int):
                out.append((tid, step))
        return out

    def trial_option(self, trial_id: int, step: int) -> Option:
        """Going on with a trial from its latest value at `step`: EI of its final over its expected cost."""
        values = self.values.get(trial_id, {})
        known = [s for s in values if s <= step]
        if not known:  # paused before its first report (a holder died): as a new configuration of its kind
            new = self.new_option()
            return Option(trial_id, new.ei, new.cost, new.mean)
        rung = max(known)
        mean, std = self.curves.predict(values[rung], rung)
        ei, p_better = expected_improvement(mean, std, self.incumbent)
        cost = self.costs.cost(self.trials[trial_id]) * self._stretch(rung, p_better)
        return Option(trial_id, ei, cost, mean)

    def predictions(self) -> dict[int, tuple[float, float]]:
        """(mean, std) of each trial's final, larger is better: its final (std 0) where it completed, else as
        predicted from its latest rung; trials without a report are left out."""
        out = {}
        for tid, values in self.values.items():
            if tid in self.finals:
                out[tid] = (self.finals[tid], 0.0)
            elif values:
                rung = max(values)
                out[tid] = self.curves.predict(values[rung], rung)
        return out

    def new_option(self) -> Option:
        """A new configuration: its final drawn from a kernel density over the study's trials so far (completed
        ones at their final, the others as predicted from their latest rung), at the study's mean cost."""
        members = [(tid, mean, std) for tid, (mean, std) in self.predictions().items()]
        if not members:
            return Option(None, 0.0, 1.0, -math.inf)
        means = np.array([m for _, m, _ in members])
        bandwidth = _silverman(means)
        scored = [expected_improvement(m, math.hypot(s, bandwidth), self.incumbent) for _, m, s in members]
        eis, chances = [ei for ei, _ in scored], [p for _, p in scored]
        cost = float(np.mean([self.costs.cost(self.trials[tid]) for tid, _, _ in members]))
        return Option(None, float(np.mean(eis)), cost * self._stretch(0, float(np.mean(chances))),
                      float(np.mean(means)))

    def _stretch(self, rung: int, p_better: float) -> float:
        """The expected share of a trial's budget spent from `rung`: up to the next rung for sure, the rest
        only if it turns out better than the incumbent (after the next rung the policy decides again)."""
        rungs, last = self.policy.rungs, self.policy.rungs[-1]
        following = next((r for r in rungs if r > rung), last)
        return ((following - rung) + (last - following) * p_better) / last
