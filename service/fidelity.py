"""The fidelity report: how well an early rung ranked the final score, what pruning saved, and
whether tuning beat the baseline on the independent test set.

Steps are percent of a trial's training budget (see docs/api.md): a trial reports at rungs such as
20 and 60, and a COMPLETE trial's value is its final validation score (step 100). Every statistic is
a pure function on plain data; `fidelity_report` is the one boundary that reads Optuna trials, turns
them into `TrialRecord`s and returns a JSON-serialisable dict. docs/fidelity.md says what each number
means and where it stops meaning anything. This module imports neither torch nor FastAPI.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from tunefleet.service.spec import Direction

__all__ = [
    "FINAL_STEP",
    "PER_EXAMPLE_KEY",
    "PROPORTION_METRICS",
    "DiffCI",
    "TrialRecord",
    "binomial_bootstrap_diff_ci",
    "bootstrap_diff_ci",
    "fidelity_report",
    "kendall",
    "record_from_trial",
    "records_from_study",
    "spearman",
    "steps_saved",
    "top_k_overlap",
    "tuned_vs_baseline",
]


FINAL_STEP = 100  # the whole training budget, in percent
# test_metrics[PER_EXAMPLE_KEY][metric]: per-example test scores, in test-set order (optional).
PER_EXAMPLE_KEY = "per_example"
# Metrics that are a fraction of test examples scored correct, so their sampling error follows from
# the score and the test-set size alone (binomial); F1 or loss need per-example scores.
PROPORTION_METRICS = frozenset({"accuracy", "exact_match"})
# Below these numbers of trials a rank correlation is respectively undefined or mostly noise.
_MIN_TRIALS_FOR_CORRELATION = 2
_MIN_TRIALS_FOR_MEANINGFUL = 10
_CONFIDENCE = 0.95
_N_RESAMPLES = 10_000
# Bounds the memory of one bootstrap chunk (resamples x distinct values) to a few tens of MB.
_BOOTSTRAP_CHUNK_CELLS = 2_000_000
# One multinomial cell costs about as much as this many indexed draws (measured, numpy 2.4).
_MULTINOMIAL_COST = 32


@dataclass(frozen=True)
class TrialRecord:
    """What the report needs of one trial, detached from Optuna.

    `state` is an Optuna state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING); `final` is the final
    validation score (None unless COMPLETE); `intermediate` maps step (percent) to the rung score.
    `test_per_example` optionally maps a metric to per-example test scores in test-set order.
    """

    number: int
    state: str
    final: float | None = None
    intermediate: Mapping[int, float] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    validation_metrics: Mapping[str, Any] = field(default_factory=dict)
    test_metrics: Mapping[str, Any] = field(default_factory=dict)
    test_per_example: Mapping[str, Sequence[float]] = field(default_factory=dict)
    is_baseline: bool = False
    feasible: bool = True  # meets the study's constraints (never the best trial otherwise)

    @property
    def last_step(self) -> int | None:
        """The latest step the trial reported, or None when it reported nothing."""
        return max(self.intermediate) if self.intermediate else None


@dataclass(frozen=True)
class DiffCI:
    """A difference tuned - baseline with a percentile bootstrap interval."""

    diff: float
    low: float
    high: float
    method: str
    n_resamples: int
    confidence: float


# ---------------------------------------------------------------------------------------------
# Statistics on plain data
# ---------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> float | None:
    """A JSON-safe float: None for None, NaN and infinities (json.dumps would write NaN otherwise)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _paired_finite(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    keep = np.isfinite(xa) & np.isfinite(ya)
    return xa[keep], ya[keep]


def _rank_correlation(
    test: Callable[[np.ndarray, np.ndarray], Any], x: Sequence[float], y: Sequence[float]
) -> float | None:
    xa, ya = _paired_finite(x, y)
    if len(xa) < _MIN_TRIALS_FOR_CORRELATION:
        return None
    # A constant column has no ranking: scipy warns and answers NaN, which we report as None.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        value = test(xa, ya).statistic
    return _finite_or_none(value)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of paired scores (ties get average ranks).

    Pairs with a missing or non-finite value are dropped. Returns None when fewer than two pairs
    remain or either side is constant. Raises ValueError when x and y differ in length.
    """
    return _rank_correlation(stats.spearmanr, x, y)


def kendall(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of paired scores: (concordant - discordant) pairs, corrected for ties.

    Same missing-value rules and errors as `spearman`.
    """
    return _rank_correlation(stats.kendalltau, x, y)


def _top_k(scores: np.ndarray, k: int, direction: Direction) -> set[int]:
    # A stable sort breaks ties by position, so equal scores give the same answer on every call.
    order = np.argsort(-scores if direction == "maximize" else scores, kind="stable")
    return set(order[:k].tolist())


def top_k_overlap(
    rung_scores: Sequence[float], final_scores: Sequence[float], k: int, direction: Direction
) -> tuple[int, int]:
    """How many of the k best trials at the rung are among the k best final trials.

    Scores are paired by position; "best" follows `direction`. Returns (overlap, k). Ties at the
    k-th place are broken by position. Raises ValueError when the lengths differ, a score is not
    finite, or k is not in 1..len(scores).
    """
    if len(rung_scores) != len(final_scores):
        raise ValueError(f"scores must be paired, got {len(rung_scores)} and {len(final_scores)}")
    rung = np.asarray(rung_scores, dtype=float)
    final = np.asarray(final_scores, dtype=float)
    if not (np.isfinite(rung).all() and np.isfinite(final).all()):
        raise ValueError("scores must be finite; drop trials without a score first")
    if not 1 <= k <= len(rung):
        raise ValueError(f"k must be between 1 and the number of trials ({len(rung)}), got {k}")
    return len(_top_k(rung, k, direction) & _top_k(final, k, direction)), k


def steps_saved(trials: Sequence[TrialRecord], final_step: int = FINAL_STEP) -> float | None:
    """Fraction of training steps the pruner saved against running the same trials to the end.

    Counts only trials whose end the pruner decided: a COMPLETE trial used `final_step`, a PRUNED
    trial used its last reported step (0 if it reported nothing). FAIL, RUNNING and WAITING trials
    are left out of both sides: a crash is not a saving, and a running trial's end is unknown.
    Returns None when no trial counts. Raises ValueError when final_step is not positive.
    """
    if final_step <= 0:
        raise ValueError(f"final_step must be positive, got {final_step}")
    used = [
        final_step if t.state == "COMPLETE" else min(t.last_step or 0, final_step)
        for t in trials
        if t.state in ("COMPLETE", "PRUNED")
    ]
    if not used:
        return None
    return 1.0 - sum(used) / (final_step * len(used))


def _percentile_ci(diff: float, resampled: np.ndarray, confidence: float, method: str) -> DiffCI:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return DiffCI(float(diff), float(low), float(high), method, len(resampled), confidence)


def _check_bootstrap_args(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def _resampled_means(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_resamples bootstrap resamples of d (n draws with replacement each)."""
    n = len(d)
    values, counts = np.unique(d, return_counts=True)
    if len(values) * _MULTINOMIAL_COST <= n:
        # Resampling n examples is drawing multinomial counts of the distinct values: for 0/1 scores
        # (at most 3 distinct differences) that is 3 numbers per resample instead of n.
        cells = len(values)

        def draw(size: int) -> np.ndarray:
            return rng.multinomial(n, counts / n, size=size) @ values / n
    else:
        cells = n

        def draw(size: int) -> np.ndarray:
            return d[rng.integers(0, n, size=(size, n))].mean(axis=1)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // cells)
    return np.concatenate([draw(min(chunk, n_resamples - start)) for start in range(0, n_resamples, chunk)])


def bootstrap_diff_ci(
    tuned: Sequence[float],
    baseline: Sequence[float],
    *,
    confidence: float = _CONFIDENCE,
    n_resamples: int = _N_RESAMPLES,
    seed: int = 0,
) -> DiffCI:
    """Paired bootstrap of mean(tuned) - mean(baseline) over per-example test scores.

    `tuned[i]` and `baseline[i]` score the same test example i (e.g. 1/0 correctness). Each resample
    draws n test examples with replacement and takes the mean of the per-example differences, so the
    interval reflects which examples happen to be in the test set and keeps the pairing. Valid for
    metrics that are means over examples (accuracy, exact match, per-example loss), not for F1.
    Deterministic for a given seed. Raises ValueError on unequal lengths, an empty or non-finite
    sample, or a confidence outside (0, 1).
    """
    _check_bootstrap_args(confidence, n_resamples)
    if len(tuned) != len(baseline) or len(tuned) == 0:
        raise ValueError(f"need paired, non-empty samples, got {len(tuned)} and {len(baseline)} examples")
    d = np.asarray(tuned, dtype=float) - np.asarray(baseline, dtype=float)
    if not np.isfinite(d).all():
        raise ValueError("per-example scores must be finite")
    means = _resampled_means(d, n_resamples, np.random.default_rng(seed))
    return _percentile_ci(float(d.mean()), means, confidence, "paired bootstrap over test examples")


def binomial_bootstrap_diff_ci(
    tuned: float,
    baseline: float,
    n_tuned: int,
    n_baseline: int,
    *,
    confidence: float = _CONFIDENCE,
    n_resamples: int = _N_RESAMPLES,
    seed: int = 0,
) -> DiffCI:
    """Parametric bootstrap of tuned - baseline for proportions (e.g. accuracy) known only in aggregate.

    Each resample draws Binomial(n, p) / n for both sides independently, p being the observed
    proportion and n the test-set size. Both models were scored on the same examples, whose
    correctness is positively correlated, so ignoring the pairing makes the interval wider than a
    paired one (conservative). At p = 0 or 1 the side has no sampling spread. Deterministic for a
    given seed. Raises ValueError when a proportion is outside [0, 1] or a size is below 1.
    """
    _check_bootstrap_args(confidence, n_resamples)
    for name, p in (("tuned", tuned), ("baseline", baseline)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a proportion in [0, 1], got {p}")
    if n_tuned < 1 or n_baseline < 1:
        raise ValueError(f"test-set sizes must be >= 1, got {n_tuned} and {n_baseline}")
    rng = np.random.default_rng(seed)
    diffs = (rng.binomial(n_tuned, tuned, n_resamples) / n_tuned
             - rng.binomial(n_baseline, baseline, n_resamples) / n_baseline)
    return _percentile_ci(tuned - baseline, diffs, confidence, "binomial bootstrap over test-set size")


# ---------------------------------------------------------------------------------------------
# From Optuna trials to plain records
# ---------------------------------------------------------------------------------------------


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _final_score(trial: FrozenTrial, objective_metric: str) -> float | None:
    if trial.state != TrialState.COMPLETE:
        return None
    if trial.values is not None and len(trial.values) == 1:
        return _finite_or_none(trial.values[0])
    # Multi-objective trials have no single value: take the objective metric from validation, or from the
    # trial's measured costs (`extra`) for a cost metric.
    measured = {**_as_dict(trial.user_attrs.get("extra")), **_as_dict(trial.user_attrs.get("validation_metrics"))}
    return _finite_or_none(measured.get(objective_metric))


def record_from_trial(trial: FrozenTrial, objective_metric: str) -> TrialRecord:
    """The TrialRecord of one Optuna trial; non-finite rung scores are dropped. Never raises."""
    attrs = trial.user_attrs
    intermediate = {int(step): float(v) for step, v in trial.intermediate_values.items()
                    if _finite_or_none(v) is not None}
    test_metrics = _as_dict(attrs.get("test_metrics"))
    # Per-example scores ride inside test_metrics so the completion protocol needs no new field.
    per_example = _as_dict(test_metrics.pop(PER_EXAMPLE_KEY, None))
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        final=_final_score(trial, objective_metric),
        intermediate=intermediate,
        params=dict(trial.params),
        validation_metrics=_as_dict(attrs.get("validation_metrics")),
        test_metrics=test_metrics,
        test_per_example=per_example,
        is_baseline=bool(attrs.get("is_baseline", False)),
        feasible=all(v <= 0.0 for v in trial.constraints.values()),
    )


def records_from_study(study: optuna.Study, objective_metric: str) -> list[TrialRecord]:
    """Every trial of the study as a TrialRecord, in trial-number order."""
    return [record_from_trial(t, objective_metric) for t in study.get_trials(deepcopy=False)]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _k_for(n: int) -> dict[str, int]:
    """The k of each top-k statistic for n trials: 5, and 10% of n rounded up."""
    return {"top5": 5, "top10pct": max(1, math.ceil(0.1 * n))}


def _rung_entry(step: int, complete: list[TrialRecord], pruned: list[TrialRecord],
                direction: Direction) -> dict[str, Any]:
    paired = [(t.intermediate[step], t.final) for t in complete
              if step in t.intermediate and t.final is not None]
    rung = [r for r, _ in paired]
    final = [f for _, f in paired]
    entry: dict[str, Any] = {
        "step": step,
        "n": len(paired),
        "n_pruned_here": sum(1 for t in pruned if t.last_step == step),
        "spearman": spearman(rung, final),
        "kendall": kendall(rung, final),
    }
    for name, k in _k_for(len(paired)).items():
        # With k >= n every trial is in both top-k sets: the overlap would be trivially n/n.
        overlap = top_k_overlap(rung, final, k, direction)[0] if k < len(paired) else None
        entry[f"{name}_overlap"] = overlap
        entry[f"{name}_k"] = k
    return entry


def _json_safe(metrics: Mapping[str, Any]) -> dict[str, Any]:
    # Workers send these dicts; a NaN among them would make the whole report invalid JSON.
    return {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in metrics.items()}


def _trial_summary(record: TrialRecord | None, objective_metric: str) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "number": record.number,
        "state": record.state,
        "params": dict(record.params),
        "value": record.final,
        "test_value": _finite_or_none(record.test_metrics.get(objective_metric)),
        "validation_metrics": _json_safe(record.validation_metrics),
        "test_metrics": _json_safe(record.test_metrics),
    }


def _best(complete: list[TrialRecord], direction: Direction) -> TrialRecord | None:
    # The tuned configuration is chosen on validation only; the test set stays untouched by the choice.
    sign = 1.0 if direction == "maximize" else -1.0
    scored = [t for t in complete if t.final is not None and t.feasible]
    # Ties go to the earlier trial, so the answer does not depend on storage order.
    return max(scored, key=lambda t: (sign * float(t.final or 0.0), -t.number)) if scored else None


def _find_baseline(records: list[TrialRecord], number: int | None) -> TrialRecord | None:
    if number is not None:
        return next((t for t in records if t.number == number), None)
    # A retried baseline leaves failed attempts behind: prefer the one that completed.
    candidates = [t for t in records if t.is_baseline]
    complete = [t for t in candidates if t.state == "COMPLETE"]
    chosen = complete or candidates
    return chosen[0] if chosen else None


def _test_size(metrics: Mapping[str, Any]) -> int | None:
    for key in ("n", "n_examples"):
        size = _finite_or_none(metrics.get(key))
        if size is not None and size >= 1:
            return int(size)
    return None


def _verdict(ci: DiffCI, direction: Direction) -> str:
    if ci.low <= 0.0 <= ci.high:
        return "no clear difference"
    tuned_higher = ci.low > 0.0
    return "tuned better" if tuned_higher == (direction == "maximize") else "baseline better"


def tuned_vs_baseline(
    tuned: TrialRecord | None,
    baseline: TrialRecord | None,
    metric: str,
    direction: Direction,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Test-set difference tuned - baseline on `metric`, with a 95% bootstrap CI where one is valid.

    Uses the paired bootstrap when both trials carry per-example test scores of the same length for
    `metric`, else the binomial bootstrap for proportion metrics with a test-set size (`n` or
    `n_examples` in test_metrics), else no interval; `reason` then says why. `verdict` reads the
    interval with the direction. Never raises.
    """
    out: dict[str, Any] = {
        "metric": metric, "direction": direction, "tuned": None, "baseline": None, "diff": None,
        "ci_low": None, "ci_high": None, "confidence": _CONFIDENCE, "method": None, "n": None,
        "verdict": None, "reason": None,
    }
    if tuned is None or baseline is None:
        out["reason"] = "no completed tuned trial" if tuned is None else "no baseline trial"
        return out
    t_value = _finite_or_none(tuned.test_metrics.get(metric))
    b_value = _finite_or_none(baseline.test_metrics.get(metric))
    out.update(tuned=t_value, baseline=b_value)
    if t_value is None or b_value is None:
        which = "tuned" if t_value is None else "baseline"
        out["reason"] = f"the {which} trial has no test {metric}"
        return out
    out["diff"] = t_value - b_value
    ci, n, reason = _diff_ci(tuned, baseline, metric, seed)
    if ci is None:
        out["reason"] = reason
        return out
    out.update(ci_low=ci.low, ci_high=ci.high, method=ci.method, n=n, verdict=_verdict(ci, direction))
    return out


def _diff_ci(tuned: TrialRecord, baseline: TrialRecord, metric: str,
             seed: int) -> tuple[DiffCI | None, int | None, str | None]:
    t_examples = tuned.test_per_example.get(metric)
    b_examples = baseline.test_per_example.get(metric)
    if t_examples is not None and b_examples is not None:
        try:
            return bootstrap_diff_ci(t_examples, b_examples, seed=seed), len(t_examples), None
        except (ValueError, TypeError) as exc:  # workers' data: report the problem, not a 500
            return None, None, f"per-example test scores unusable: {exc}"
    if metric not in PROPORTION_METRICS:
        return None, None, (f"{metric} is not a proportion of examples: a confidence interval needs "
                            f"per-example test scores (test_metrics.{PER_EXAMPLE_KEY}.{metric})")
    n_t, n_b = _test_size(tuned.test_metrics), _test_size(baseline.test_metrics)
    if n_t is None or n_b is None:
        return None, None, "test_metrics carry no test-set size (n or n_examples): interval unavailable"
    p_t, p_b = float(tuned.test_metrics[metric]), float(baseline.test_metrics[metric])
    if not (0.0 <= p_t <= 1.0 and 0.0 <= p_b <= 1.0):
        return None, None, f"test {metric} is not in [0, 1]: interval unavailable"
    return binomial_bootstrap_diff_ci(p_t, p_b, n_t, n_b, seed=seed), min(n_t, n_b), None


def _importances(study: optuna.Study, n_complete: int) -> tuple[dict[str, float] | None, list[str]]:
    if len(study.directions) > 1:
        # Optuna would silently pick an objective, and a custom target is read as "lower is better".
        return None, ["parameter importances are computed for single-objective studies only"]
    if n_complete < 2:
        return None, ["parameter importances need at least 2 completed trials"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError, TypeError) as exc:
            # Importances are a convenience: a study they cannot handle still gets its report.
            return None, [f"parameter importances unavailable: {exc}"]
    notes = [f"parameter importances: {w.message}" for w in caught
             if not issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    return {name: float(value) for name, value in importances.items()}, notes


def _count_warnings(n_complete: int, n_pruned: int) -> list[str]:
    notes = []
    if n_complete < _MIN_TRIALS_FOR_CORRELATION:
        notes.append(f"only {n_complete} trial(s) reached the end: rank correlations and top-k "
                     "overlaps cannot be computed")
    elif n_complete < _MIN_TRIALS_FOR_MEANINGFUL:
        notes.append(f"only {n_complete} trials reached the end: correlations over fewer than "
                     f"{_MIN_TRIALS_FOR_MEANINGFUL} trials are not meaningful (one swapped pair moves "
                     "them a lot)")
    if n_pruned:
        notes.append(f"{n_pruned} trial(s) were pruned: rung statistics cover only the trials that "
                     "reached the end, which the pruner selected; a pruned late bloomer is invisible "
                     "here")
    return notes


def _baseline_warnings(baseline: TrialRecord | None, best: TrialRecord | None,
                       number: int | None) -> list[str]:
    if baseline is None:
        where = f"trial {number} does not exist" if number is not None else "no trial has is_baseline"
        return [f"no baseline: {where}; tuned vs baseline is unavailable"]
    notes = []
    if baseline.state != "COMPLETE":
        notes.append(f"the baseline trial {baseline.number} is {baseline.state} (last step "
                     f"{baseline.last_step}): it has no final or test score")
    if best is not None and best.number == baseline.number:
        notes.append("the baseline is the best trial: tuning found nothing better on validation")
    return notes


def fidelity_report(
    study: optuna.Study,
    *,
    direction: Direction,
    rungs: Sequence[int],
    baseline_trial_number: int | None,
    objective_metric: str,
    seed: int = 0,
) -> dict[str, Any]:
    """The fidelity report of a study as a JSON-serialisable dict (no NaN: missing numbers are None).

    `rungs` are the study's steps in percent; the final step (100) is left out of the per-rung table
    since it is the final score itself. Correlations and top-k overlaps use the COMPLETE trials that
    reported at the rung. The baseline is trial `baseline_trial_number`, or else the completed trial
    with user_attrs.is_baseline. `seed` makes the bootstrap reproducible. Statistics that cannot be
    computed are None and `warnings` says why; raises ValueError only for an unknown direction.
    """
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    records = records_from_study(study, objective_metric)
    complete = [t for t in records if t.state == "COMPLETE" and t.final is not None]
    pruned = [t for t in records if t.state == "PRUNED"]
    best = _best(complete, direction)
    baseline = _find_baseline(records, baseline_trial_number)
    importances, importance_notes = _importances(study, len(complete))
    rung_entries = [_rung_entry(step, complete, pruned, direction)
                    for step in sorted(set(rungs)) if step < FINAL_STEP]
    warnings_out = _count_warnings(len(complete), len(pruned))
    warnings_out += [f"no completed trial reported at step {e['step']}" for e in rung_entries
                     if e["n"] == 0 and complete]
    warnings_out += _baseline_warnings(baseline, best, baseline_trial_number) + importance_notes
    return {
        "objective_metric": objective_metric,
        "direction": direction,
        "rungs": rung_entries,
        "n_trials": len(records),
        "n_complete": len(complete),
        "n_pruned": len(pruned),
        "n_failed": sum(1 for t in records if t.state == "FAIL"),
        "n_running": sum(1 for t in records if t.state in ("RUNNING", "WAITING")),
        "steps_saved_fraction": steps_saved(records),
        "best_trial": _trial_summary(best, objective_metric),
        "baseline": _trial_summary(baseline, objective_metric),
        "tuned_vs_baseline": tuned_vs_baseline(best, baseline, objective_metric, direction, seed=seed),
        "importances": importances,
        "warnings": warnings_out,
    }
