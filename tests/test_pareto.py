"""Cost objectives, constraints and the Pareto front on PostgreSQL: what a spec may name (every bad one a 422),
constraints computed from what trials report and set where Optuna's samplers read them, infeasible trials
never best nor on the front (the simulated worker over HTTP), and the front equal to Optuna's own
`study.best_trials`."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import optuna
import pytest
from typer.testing import CliRunner

from tests.conftest import LiveServer, study_spec
from tunefleet.cli import app
from tunefleet.service.backend import StudyRuntime
from tunefleet.service.client import Client
from tunefleet.service.spec import validate_spec
from tunefleet.service.studies import best_trials
from tunefleet.workers.loop import WorkerLoop
from tunefleet.workers.simulated import SimulatedTrainer

SPACE = {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
         "lora_r": {"type": "categorical", "choices": [4, 8, 16, 32]},
         "method": {"type": "categorical", "choices": ["lora", "full"]}}
# Full fine-tuning at its best rate: the highest simulated score, and 1,500 MB of peak memory.
FULL_BEST = {"learning_rate": 3e-5, "lora_r": 8, "method": "full"}


def _simulated_worker(client: Client, tmp_path: Path) -> WorkerLoop:
    """The pull loop over HTTP with the simulated trainer, which reports method-dependent costs
    (`simulated_costs`: full fine-tuning 1,500 MB and 20.8 samples/s, LoRA 400 MB + 8 MB × rank and 27.6)."""
    return WorkerLoop(client, SimulatedTrainer(), worker_id="sim", device="cpu", once=True, idle_sleep=0.1,
                      workdir=tmp_path / "sim")


def _errors(http: httpx.Client, spec: dict) -> list[tuple[list, str]]:
    answer = http.post("/studies", json=spec)
    assert answer.status_code == 422, answer.text
    return [(e["loc"], e["msg"]) for e in answer.json()["detail"]]


def test_specs_name_cost_metrics_and_constraints_or_get_a_422(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as http:
        two = [{"metric": "accuracy", "direction": "maximize"}, {"metric": "gpu_hours", "direction": "minimize"}]
        ok = study_spec("cost-ok", objective=two, search={"sampler": "nsga2", "pruner": "none"},
                        constraints=[{"metric": "peak_memory_mb", "max": 8000}, {"metric": "f1_macro", "min": 0.5}])
        assert http.post("/studies", json=ok).status_code == 201
        [(loc, msg)] = _errors(http, study_spec("bad-metric", objective={"metric": "latency_ms"}))
        assert loc == ["objective", "metric"] and "train_seconds, gpu_hours, peak_memory_mb, samples_per_second" in msg
        [(loc, msg)] = _errors(http, study_spec("cost-pruned", objective={"metric": "train_seconds",
                                                                          "direction": "minimize"}))
        assert loc == ["search", "pruner"] and "search.pruner: none" in msg
        for constraint, where, fix in (({"metric": "peak_memory_mb"}, ["constraints", 0], "give min, max or both"),
                                       ({"metric": "loss", "min": 2, "max": 1}, ["constraints", 0], "min <= max"),
                                       ({"metric": "vram", "max": 1}, ["constraints", 0, "metric"], "cost metric")):
            [(loc, msg)] = _errors(http, study_spec("bad-constraint", constraints=[constraint]))
            assert loc == where and fix in msg, (loc, msg)


def test_a_completion_without_a_constraint_metric_is_a_422_naming_it(server: LiveServer) -> None:
    with Client(server.url) as client:
        client.create_study(study_spec("needs-memory", baseline=None, search={"sampler": "random", "pruner": "none"},
                                       constraints=[{"metric": "peak_memory_mb", "max": 1000}]))
        lease = client.lease("w", {}, "h")
        answer = httpx.post(f"{server.url}/api/v1/trials/{lease['trial_id']}/complete",
                            json={"value": 0.9, "validation_metrics": {"accuracy": 0.9}},
                            headers={"X-Lease-Token": lease["lease_token"]})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == ["body", "validation_metrics", "peak_memory_mb"]
        done = client.complete(lease["trial_id"], value=0.9, extra={"peak_memory_mb": 1200.0})
    assert done["constraints"] == {"peak_memory_mb:max": 200.0} and done["feasible"] is False


def test_an_infeasible_trial_is_never_best_and_samplers_see_its_constraints(server: LiveServer,
                                                                           tmp_path: Path) -> None:
    spec = study_spec("memory-capped", baseline=FULL_BEST, search_space=SPACE, budget={"max_trials": 8},
                      search={"sampler": "tpe", "pruner": "none", "seed": 0, "n_startup_trials": 4},
                      constraints=[{"metric": "peak_memory_mb", "max": 1000}])
    with Client(server.url) as client:
        study = client.create_study(spec)
        assert _simulated_worker(client, tmp_path).run() == 8
        shown = client.get_study(study["id"])
        trials = client.list_trials(study["id"])["items"]
        report = client.study_report(study["id"])
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    baseline = next(t for t in complete if t["is_baseline"])
    assert baseline["feasible"] is False and baseline["constraints"] == {"peak_memory_mb:max": 500.0}
    assert baseline["value"] == max(t["value"] for t in complete), "the best score, but over the memory cap"
    feasible = [t for t in complete if t["feasible"]]
    assert feasible and all(t["params"]["method"] == "lora" for t in feasible)
    best = shown["best_trial"]
    assert best["feasible"] and best["value"] == max(t["value"] for t in feasible)
    assert report["best_trial"]["number"] == best["number"], "the fidelity report counts feasible trials only"
    loaded = optuna.load_study(study_name="memory-capped", storage=server.settings.resolved_database_url)
    assert loaded.best_trial.number == best["number"], "Optuna's own best_trial agrees"
    assert loaded.trials[baseline["number"]].constraints == {"peak_memory_mb:max": 500.0}, \
        "stored where TPE, GP and NSGA-II read constraints"


def test_the_front_of_a_constrained_multi_objective_study_is_optunas(server: LiveServer, tmp_path: Path) -> None:
    objectives = [{"metric": "accuracy", "direction": "maximize"},
                  {"metric": "peak_memory_mb", "direction": "minimize"}]
    spec = study_spec("fast-enough", objective=objectives, baseline=FULL_BEST, search_space=SPACE,
                      budget={"max_trials": 8}, search={"sampler": "nsga2", "pruner": "none", "seed": 1},
                      constraints=[{"metric": "samples_per_second", "min": 25}])
    with Client(server.url) as client:
        study = client.create_study(spec)
        assert _simulated_worker(client, tmp_path).run() == 8
        shown = client.get_study(study["id"])
        report = client.study_report(study["id"])
    front = [t["number"] for t in shown["best_trials"]]
    loaded = optuna.load_study(study_name="fast-enough", storage=server.settings.resolved_database_url)
    assert front and set(front) == {t.number for t in loaded.best_trials}
    assert all(t["feasible"] and t["params"]["method"] == "lora" for t in shown["best_trials"])
    assert [e["number"] for e in report["pareto_front"]] == front
    accuracy = [t["values"][0] for t in shown["best_trials"]]
    assert accuracy == sorted(accuracy, reverse=True), "best first by the first objective"
    rendered = CliRunner().invoke(app, ["--server", server.url, "study", "report", str(study["id"])],
                                  env={"COLUMNS": "200"})
    assert rendered.exit_code == 0 and "pareto_front" in rendered.output and "objectives" in rendered.output
    baseline = CliRunner().invoke(app, ["--server", server.url, "trial", "show", str(shown["baseline_trial_id"])],
                                  env={"COLUMNS": "200"})
    assert baseline.exit_code == 0 and "feasible" in baseline.output and "samples_per_second:min" in baseline.output


def test_one_cost_objective_is_the_measured_cost_and_rungs_stay_out_of_optuna(server: LiveServer,
                                                                               tmp_path: Path) -> None:
    spec = study_spec("least-memory", objective={"metric": "peak_memory_mb", "direction": "minimize"},
                      search_space=SPACE, baseline=FULL_BEST, budget={"max_trials": 4},
                      search={"sampler": "random", "pruner": "none", "seed": 2})
    with Client(server.url) as client:
        study = client.create_study(spec)
        assert _simulated_worker(client, tmp_path).run() == 4
        trials = client.list_trials(study["id"])["items"]
        best = client.get_study(study["id"])["best_trial"]
    for t in trials:
        assert t["value"] == t["extra"]["peak_memory_mb"] and t["intermediate_values"] == {}
        assert set(t["rung_metrics"]) == {"20", "60", "100"}, "the rung reports are kept for the record"
    assert best["value"] == min(t["value"] for t in trials)


@pytest.mark.parametrize("directions", [["maximize", "minimize"], ["minimize", "minimize", "maximize"]])
def test_best_trials_match_optuna_with_ties_and_constraints(directions: list[str]) -> None:
    rng = random.Random(len(directions))
    study = optuna.create_study(directions=directions)
    for i in range(60):
        trial = study.ask()
        if i % 3:
            trial.set_constraint("memory:max", rng.choice([-1.0, 0.0, 2.0]))
        # Coarse values give ties and duplicates, which Optuna keeps on the front.
        study.tell(trial, [float(rng.randint(0, 5)) for _ in directions])
    objectives = [{"metric": m, "direction": d} for m, d in zip(("accuracy", "loss", "f1_macro"), directions,
                                                                 strict=False)]
    spec = validate_spec(study_spec(objective=objectives, search={"sampler": "nsga2", "pruner": "none"}))
    runtime = StudyRuntime(0, "s", spec, study, {}, [100], None)  # type: ignore[arg-type]
    ours = [t.number for t in best_trials(runtime, study.trials)]
    assert sorted(ours) == sorted(t.number for t in study.best_trials)
