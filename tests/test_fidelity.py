"""The fidelity statistics on hand-made studies whose answers are known in advance."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from tunefleet.fidelity_plots import PLOTS, render_report
from tunefleet.service.fidelity import (
    TrialRecord,
    binomial_bootstrap_diff_ci,
    bootstrap_diff_ci,
    fidelity_report,
    kendall,
    spearman,
    steps_saved,
    top_k_overlap,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

_DISTRIBUTIONS = {"learning_rate": FloatDistribution(1e-5, 1e-2, log=True)}


def _study(direction: str = "maximize") -> optuna.Study:
    return optuna.create_study(storage=None, direction=direction)


def _add(study: optuna.Study, state: TrialState, *, rungs: Mapping[int, float] | None = None,
         final: float | None = None, **user_attrs: Any) -> None:
    """One trial whose learning rate grows with its number, so importances have something to see."""
    lr = 1e-5 * 1.5 ** len(study.get_trials(deepcopy=False))
    study.add_trial(create_trial(state=state, value=final, params={"learning_rate": lr},
                                 distributions=_DISTRIBUTIONS, intermediate_values=dict(rungs or {}),
                                 user_attrs=user_attrs))


def _complete_study(rung20: Sequence[float], finals: Sequence[float], direction: str = "maximize"
                    ) -> optuna.Study:
    study = _study(direction)
    for r, f in zip(rung20, finals, strict=True):
        _add(study, TrialState.COMPLETE, rungs={20: r, 60: (r + f) / 2}, final=f)
    return study


def _report(study: optuna.Study, direction: str = "maximize", metric: str = "accuracy",
            baseline: int | None = None) -> dict[str, Any]:
    report = fidelity_report(study, direction=direction, rungs=[20, 60, 100],  # type: ignore[arg-type]
                             baseline_trial_number=baseline, objective_metric=metric)
    json.dumps(report, allow_nan=False)  # the API must be able to send it as is
    return report


def _rung(report: Mapping[str, Any], step: int) -> dict[str, Any]:
    return next(r for r in report["rungs"] if r["step"] == step)


FINALS = [0.50 + 0.04 * i for i in range(10)]  # trial i is the i-th worst


# --- rank correlations -----------------------------------------------------------------------


def test_identical_ranking_gives_perfect_agreement() -> None:
    report = _report(_complete_study([f - 0.3 for f in FINALS], FINALS))
    rung = _rung(report, 20)
    assert (rung["n"], rung["spearman"], rung["kendall"]) == (10, pytest.approx(1.0), pytest.approx(1.0))
    assert (rung["top5_overlap"], rung["top5_k"]) == (5, 5)
    assert (rung["top10pct_overlap"], rung["top10pct_k"]) == (1, 1)
    assert [r["step"] for r in report["rungs"]] == [20, 60]  # step 100 is the final score itself
    assert report["best_trial"]["number"] == 9


def test_reversed_ranking_gives_minus_one_and_no_overlap() -> None:
    rung = _rung(_report(_complete_study([1.0 - f for f in FINALS], FINALS)), 20)
    assert rung["spearman"] == pytest.approx(-1.0)
    assert rung["kendall"] == pytest.approx(-1.0)
    assert rung["top5_overlap"] == 0


def test_kendall_and_spearman_match_hand_computation() -> None:
    # One swapped neighbour pair among 5: 9 concordant, 1 discordant pair -> tau = (9 - 1) / 10;
    # rank differences (0, 0, 0, 1, 1) -> rho = 1 - 6 * 2 / (5 * (25 - 1)) = 0.9.
    x, y = [1, 2, 3, 4, 5], [1, 2, 3, 5, 4]
    assert kendall(x, y) == pytest.approx(0.8)
    assert spearman(x, y) == pytest.approx(0.9)
    study = _complete_study([0.1, 0.2, 0.3, 0.5, 0.4], [0.6, 0.7, 0.8, 0.9, 0.95])
    rung = _rung(_report(study), 20)
    assert (rung["kendall"], rung["spearman"]) == (pytest.approx(0.8), pytest.approx(0.9))


def test_correlations_skip_missing_values_and_return_none_when_undefined() -> None:
    assert spearman([1, 2, float("nan"), 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert spearman([1.0], [2.0]) is None
    assert kendall([1, 1, 1], [1, 2, 3]) is None  # a constant rung score ranks nothing
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


# --- top-k overlap ---------------------------------------------------------------------------


def test_top5_overlap_of_exactly_four() -> None:
    # At the rung, the 6th best final trial (number 4) swaps places with the 5th best (number 5).
    rung20 = [f - 0.3 for f in FINALS]
    rung20[4], rung20[5] = rung20[5], rung20[4]
    assert top_k_overlap(rung20, FINALS, 5, "maximize") == (4, 5)
    assert _rung(_report(_complete_study(rung20, FINALS)), 20)["top5_overlap"] == 4


def test_top_k_follows_direction() -> None:
    # Lower is better: the two smallest at the rung (0, 1) are the two smallest final (0, 1).
    assert top_k_overlap([0.1, 0.2, 0.9, 0.8], [1.0, 2.0, 4.0, 3.0], 2, "minimize") == (2, 2)
    assert top_k_overlap([0.1, 0.2, 0.9, 0.8], [1.0, 2.0, 4.0, 3.0], 2, "maximize") == (2, 2)
    assert top_k_overlap([0.1, 0.2, 0.9, 0.8], [4.0, 3.0, 1.0, 2.0], 2, "maximize") == (0, 2)


def test_top_k_rejects_k_out_of_range() -> None:
    with pytest.raises(ValueError):
        top_k_overlap([1, 2, 3], [1, 2, 3], 4, "maximize")
    with pytest.raises(ValueError):
        top_k_overlap([1, 2, 3], [1, 2, 3], 0, "maximize")


# --- steps saved -----------------------------------------------------------------------------


def test_steps_saved_by_hand() -> None:
    study = _study()
    for _ in range(4):
        _add(study, TrialState.PRUNED, rungs={20: 0.3})
    for _ in range(2):
        _add(study, TrialState.PRUNED, rungs={20: 0.5, 60: 0.6})
    for f in FINALS:
        _add(study, TrialState.COMPLETE, rungs={20: f - 0.2, 60: f - 0.1}, final=f)
    # Neither a crash nor a running trial counts (see steps_saved's docstring).
    _add(study, TrialState.FAIL, rungs={20: 0.4})
    _add(study, TrialState.RUNNING, rungs={20: 0.4})
    report = _report(study)
    assert report["steps_saved_fraction"] == pytest.approx((4 * 80 + 2 * 40) / (16 * 100))
    assert (report["n_complete"], report["n_pruned"], report["n_failed"], report["n_running"]) == (10, 6, 1, 1)
    assert (_rung(report, 20)["n_pruned_here"], _rung(report, 60)["n_pruned_here"]) == (4, 2)
    assert any("pruned" in w for w in report["warnings"])


def test_steps_saved_edge_cases() -> None:
    assert steps_saved([]) is None
    assert steps_saved([TrialRecord(0, "COMPLETE", final=1.0)]) == 0.0
    assert steps_saved([TrialRecord(0, "PRUNED")]) == 1.0  # pruned before its first report


# --- tuned vs baseline -----------------------------------------------------------------------


def test_paired_bootstrap_contains_true_difference_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    baseline = (rng.random(n) < 0.80).astype(float)
    tuned = (rng.random(n) < 0.85).astype(float)  # true difference 0.05
    ci = bootstrap_diff_ci(tuned, baseline, seed=7)
    assert ci.low < 0.05 < ci.high
    assert ci.diff == pytest.approx(tuned.mean() - baseline.mean())
    assert bootstrap_diff_ci(tuned, baseline, seed=7) == ci
    assert bootstrap_diff_ci(tuned, baseline, seed=8) != ci


def test_binomial_bootstrap_matches_normal_approximation() -> None:
    ci = binomial_bootstrap_diff_ci(0.9, 0.8, 1000, 1000, seed=0)
    half_width = 1.96 * math.sqrt(0.9 * 0.1 / 1000 + 0.8 * 0.2 / 1000)
    assert ci.low < 0.1 < ci.high
    assert (ci.high - ci.low) / 2 == pytest.approx(half_width, rel=0.1)
    with pytest.raises(ValueError):
        binomial_bootstrap_diff_ci(1.2, 0.8, 100, 100)


def test_pairing_narrows_the_interval_when_models_agree() -> None:
    # The tuned model fixes 30 of the baseline's 200 errors and breaks nothing else.
    baseline = np.array([0.0] * 200 + [1.0] * 800)
    tuned = baseline.copy()
    tuned[:30] = 1.0
    paired = bootstrap_diff_ci(tuned, baseline, seed=0)
    unpaired = binomial_bootstrap_diff_ci(tuned.mean(), baseline.mean(), 1000, 1000, seed=0)
    assert paired.high - paired.low < (unpaired.high - unpaired.low) / 2


def _baseline_study(tuned_test: Mapping[str, Any], baseline_test: Mapping[str, Any],
                    direction: str = "maximize") -> optuna.Study:
    study = _study(direction)
    worse, better = (0.7, 0.9) if direction == "maximize" else (0.9, 0.7)
    _add(study, TrialState.COMPLETE, rungs={20: 0.5}, final=worse, is_baseline=True,
         test_metrics=dict(baseline_test))
    _add(study, TrialState.COMPLETE, rungs={20: 0.6}, final=better, test_metrics=dict(tuned_test))
    return study


def test_report_uses_binomial_bootstrap_with_test_size() -> None:
    report = _report(_baseline_study({"accuracy": 0.9, "n": 1000}, {"accuracy": 0.8, "n_examples": 1000}))
    comparison = report["tuned_vs_baseline"]
    assert (report["best_trial"]["number"], report["baseline"]["number"]) == (1, 0)
    assert comparison["diff"] == pytest.approx(0.1)
    assert comparison["ci_low"] < 0.1 < comparison["ci_high"]
    assert comparison["method"].startswith("binomial")
    assert comparison["verdict"] == "tuned better"


def test_report_without_test_size_says_why_there_is_no_interval() -> None:
    comparison = _report(_baseline_study({"accuracy": 0.9}, {"accuracy": 0.8}))["tuned_vs_baseline"]
    assert comparison["diff"] == pytest.approx(0.1)
    assert comparison["ci_low"] is None and comparison["verdict"] is None
    assert "test-set size" in comparison["reason"]


def test_minimize_with_per_example_losses() -> None:
    rng = np.random.default_rng(0)
    base_losses = rng.gamma(2.0, 0.5, 500)
    tuned_losses = base_losses * 0.8  # lower loss is better
    study = _baseline_study({"loss": float(tuned_losses.mean()), "per_example": {"loss": tuned_losses.tolist()}},
                            {"loss": float(base_losses.mean()), "per_example": {"loss": base_losses.tolist()}},
                            direction="minimize")
    report = _report(study, direction="minimize", metric="loss")
    comparison = report["tuned_vs_baseline"]
    assert report["best_trial"]["number"] == 1  # the lower validation loss
    assert comparison["diff"] < 0 and comparison["ci_high"] < 0
    assert comparison["method"].startswith("paired")
    assert comparison["verdict"] == "tuned better"
    assert "per_example" not in report["best_trial"]["test_metrics"]  # kept out of the JSON answer


def test_minimize_ranks_lowest_first() -> None:
    losses = [1.0 - f for f in FINALS]
    report = _report(_complete_study([x + 0.2 for x in losses], losses, "minimize"), direction="minimize")
    assert _rung(report, 20)["top5_overlap"] == 5
    assert report["best_trial"]["number"] == 9


def test_baseline_pruned_or_missing_is_reported() -> None:
    study = _complete_study([f - 0.3 for f in FINALS], FINALS)
    _add(study, TrialState.PRUNED, rungs={20: 0.1}, is_baseline=True)
    report = _report(study)
    assert report["baseline"]["number"] == 10
    assert any("PRUNED" in w for w in report["warnings"])
    assert report["tuned_vs_baseline"]["diff"] is None
    assert any("does not exist" in w for w in _report(study, baseline=99)["warnings"])


# --- degenerate studies ----------------------------------------------------------------------


def test_fewer_than_two_complete_trials_gives_nulls_and_a_warning() -> None:
    study = _study()
    _add(study, TrialState.COMPLETE, rungs={20: 0.5, 60: 0.6}, final=0.7)
    _add(study, TrialState.PRUNED, rungs={20: 0.2})
    report = _report(study)
    rung = _rung(report, 20)
    assert rung["n"] == 1
    assert rung["spearman"] is None and rung["kendall"] is None
    assert rung["top5_overlap"] is None and rung["top10pct_overlap"] is None
    assert report["importances"] is None
    assert any("only 1 trial" in w for w in report["warnings"])


def test_empty_study() -> None:
    report = _report(_study())
    assert report["n_trials"] == 0 and report["best_trial"] is None
    assert report["steps_saved_fraction"] is None
    assert all(r["n"] == 0 for r in report["rungs"])


def test_few_trials_warn_that_correlations_are_noisy() -> None:
    report = _report(_complete_study([0.1, 0.2, 0.3], [0.6, 0.7, 0.8]))
    assert _rung(report, 20)["top5_overlap"] is None  # k = 5 >= n = 3 would be trivially 3/3
    assert any("not meaningful" in w for w in report["warnings"])


# --- rendering -------------------------------------------------------------------------------


def test_render_report_html_and_png(tmp_path: Any) -> None:
    study = _complete_study([f - 0.3 for f in FINALS], FINALS)
    _add(study, TrialState.PRUNED, rungs={20: 0.1})
    _add(study, TrialState.COMPLETE, rungs={20: 0.3, 60: 0.5}, final=0.75, is_baseline=True,
         test_metrics={"accuracy": 0.74, "n": 300})
    report = _report(study)
    style_before = dict(plt.rcParams)
    page = render_report(study, report, tmp_path / "html", fmt="html")
    assert dict(plt.rcParams) == style_before  # Optuna's ggplot style does not leak out
    assert not plt.get_fignums()  # every figure was closed
    text = page.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == len(PLOTS)
    assert "Spearman" in text
    sheet = render_report(study, report, tmp_path / "png", fmt="png")
    assert sheet.read_bytes().startswith(b"\x89PNG")
    for name in PLOTS:
        assert (tmp_path / "png" / f"{name}.png").stat().st_size > 1000


def test_render_report_of_a_degenerate_study(tmp_path: Any) -> None:
    study = _study()
    _add(study, TrialState.PRUNED, rungs={20: 0.2})
    page = render_report(study, _report(study), tmp_path, fmt="html")
    assert page.read_text(encoding="utf-8").count("data:image/png;base64,") == len(PLOTS)
    with pytest.raises(ValueError):
        render_report(study, _report(study), tmp_path, fmt="pdf")  # type: ignore[arg-type]


def test_multi_objective_study_uses_the_validation_metric(tmp_path: Any) -> None:
    study = optuna.create_study(storage=None, directions=["maximize", "minimize"])
    for i, f in enumerate(FINALS[:4]):
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[f, 10.0 - i],
                                     params={"learning_rate": 1e-4 * (i + 1)}, distributions=_DISTRIBUTIONS,
                                     user_attrs={"validation_metrics": {"accuracy": f}}))
    report = _report(study)
    assert report["best_trial"]["number"] == 3
    assert report["importances"] is None
    assert any("single-objective" in w for w in report["warnings"])
    assert render_report(study, report, tmp_path, fmt="png").stat().st_size > 1000
