"""The fidelity report's parameter importances carry a caveat when few trials completed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from tunefleet.fidelity_plots import MIN_TRIALS_FOR_IMPORTANCES, PLOTS, render_report
from tunefleet.service.fidelity import fidelity_report, records_from_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

_DISTRIBUTIONS = {"learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
                  "weight_decay": FloatDistribution(0.0, 0.1)}


def _study(n_complete: int) -> optuna.Study:
    """`n_complete` finished trials whose score follows the learning rate, so importances are defined."""
    study = optuna.create_study(storage=None, direction="maximize")
    for i in range(n_complete):
        lr = 1e-5 * 1.8 ** i
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5 + 0.03 * i,
                                     params={"learning_rate": lr, "weight_decay": (i * 7 % 10) / 100},
                                     distributions=_DISTRIBUTIONS, intermediate_values={20: 0.3 + 0.02 * i}))
    return study


def _report(study: optuna.Study) -> dict[str, Any]:
    return fidelity_report(study, direction="maximize", rungs=[20, 100],  # type: ignore[arg-type]
                           baseline_trial_number=None, objective_metric="accuracy")


def _importances_title(study: optuna.Study, report: dict[str, Any]) -> str:
    draw = PLOTS["param_importances"][1]
    with plt.style.context("ggplot"):
        fig = draw(study, records_from_study(study, "accuracy"), report)
    try:
        return fig.axes[0].get_title()
    finally:
        plt.close(fig)


@pytest.mark.parametrize("n", [3, MIN_TRIALS_FOR_IMPORTANCES - 1])
def test_importances_from_few_trials_say_indicative_only(n: int, tmp_path: Path) -> None:
    study = _study(n)
    report = _report(study)
    assert report["importances"]  # computed: the caveat is what tells the reader how far to trust them
    assert _importances_title(study, report) == f"Parameter importances from {n} completed trials: indicative only"
    page = render_report(study, report, tmp_path, fmt="html").read_text(encoding="utf-8")
    assert f"from {n} completed trials: indicative only" in page


def test_importances_from_enough_trials_have_no_caveat(tmp_path: Path) -> None:
    study = _study(MIN_TRIALS_FOR_IMPORTANCES)
    report = _report(study)
    assert _importances_title(study, report) == "Parameter importances"
    page = render_report(study, report, tmp_path, fmt="html").read_text(encoding="utf-8")
    assert "indicative only" not in page
