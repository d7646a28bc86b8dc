"""A multi-objective study with a cost objective, end to end: a real worker process (`tunefleet worker`,
transformers + PEFT on a tiny BERT) maximizes validation accuracy and minimizes the training seconds it
measures, against a live server on PostgreSQL; the Pareto front is the same in the API, in Optuna's own
`study.best_trials`, in `tunefleet study show` and in the fidelity report, and any trial of it exports."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import optuna
from typer.testing import CliRunner

from tests.conftest import LiveServer
from tunefleet.cli import app
from tunefleet.service.client import Client

OBJECTIVES = [{"metric": "accuracy", "direction": "maximize"}, {"metric": "train_seconds", "direction": "minimize"}]


def _spec(make_spec: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    spec = make_spec(sizes=(48, 16, 16), objective=OBJECTIVES)
    spec["fixed"] = {k: v for k, v in spec["fixed"].items() if k != "learning_rate"}
    spec.update(
        name="accuracy-vs-seconds",
        # More steps cost more seconds and (mostly) buy accuracy: a trade-off for the front.
        search_space={"max_steps": {"type": "int", "low": 1, "high": 12},
                      "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        search={"sampler": "nsga2", "pruner": "none", "rungs": [100], "seed": 3},
        budget={"max_trials": 3},
    )
    return spec


def _dominated(values: list[float], by: list[float]) -> bool:
    """Whether (accuracy ↑, seconds ↓) `values` are dominated by `by`."""
    better_or_equal = by[0] >= values[0] and by[1] <= values[1]
    return better_or_equal and by != values


def _cli(live: LiveServer, *args: str) -> str:
    result = CliRunner().invoke(app, ["--server", live.url, *args], catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_accuracy_against_train_seconds_gives_one_front_everywhere(server: LiveServer, make_spec, tmp_path) -> None:
    with Client(server.url) as client:
        study = client.create_study(_spec(make_spec))
        worker = subprocess.run(
            [sys.executable, "-m", "tunefleet", "worker", "--server", server.url, "--once", "--device", "cpu",
             "--worker-id", "pareto-worker", "--workdir", str(tmp_path / "w"), "--idle-sleep", "0.2"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
        assert worker.returncode == 0, worker.stderr[-3000:]
        shown = client.get_study(study["id"])
        trials = client.list_trials(study["id"])["items"]
        report = client.study_report(study["id"])

    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert shown["state"] == "completed" and len(complete) == 3
    for t in complete:  # the worker measured its costs, and the objective values are made of them
        extra = t["extra"]
        assert extra["train_seconds"] > 0 and extra["peak_memory_mb"] > 0 and extra["samples_per_second"] > 0
        assert extra["gpu_hours"] == 0.0, "a CPU trial holds no accelerator"
        assert t["values"] == [t["validation_metrics"]["accuracy"], extra["train_seconds"]]

    front = {t["number"] for t in shown["best_trials"]}
    expected = {t["number"] for t in complete
                if not any(_dominated(t["values"], o["values"]) for o in complete)}
    assert front == expected and front, (front, [(t["number"], t["values"]) for t in complete])
    optuna_study = optuna.load_study(study_name="accuracy-vs-seconds", storage=server.settings.resolved_database_url)
    assert front == {t.number for t in optuna_study.best_trials}, "Optuna's own best_trials agree"
    assert shown["best_trial"] is None, "several objectives: no single best"

    assert [o["objective_metric"] for o in report["objectives"]] == ["accuracy", "train_seconds"]
    assert {e["number"] for e in report["pareto_front"]} == front
    fastest = min(complete, key=lambda t: (t["extra"]["train_seconds"], t["number"]))
    assert report["objectives"][1]["best_trial"]["number"] == fastest["number"]

    table = _cli(server, "study", "show", str(study["id"]))
    assert "Pareto front" in table and "train_seconds ↓" in table and "accuracy ↑" in table
    assert all(f"#{n}" in table for n in front)

    chosen = max(front)
    out = tmp_path / "chosen"
    assert f"trial #{chosen}" in _cli(server, "study", "export", str(study["id"]), "--trial", str(chosen),
                                      "--out", str(out))
    assert (out / "README.md").is_file() and (out / "trainer_log.json").is_file()
    assert any(out.rglob("*.safetensors")), "the trial's model or adapter"
    if len(front) > 1:
        result = CliRunner().invoke(app, ["--server", server.url, "study", "export", str(study["id"]), "--best",
                                          str(tmp_path / "best")])
        assert result.exit_code == 1 and "--trial N" in result.output

