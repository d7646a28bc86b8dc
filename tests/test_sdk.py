"""Script studies, the SDK and the agent's trainer (no torch): the spec of `task: script`, leases matched to
the worker's tasks, the SDK on its own, and `ScriptTrainer` running real processes over its real channel
(the server's part is a `Reports` double; tests/test_agent.py runs it all against a live server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, get_args

import pytest

from tests.conftest import LiveServer, study_spec
from tests.workers.fakes import Reports
from tunefleet import sdk
from tunefleet.sdk.protocol import Action
from tunefleet.service.client import ApiError, Client
from tunefleet.service.spec import ReportAction, SpecError, parse_spec_text, validate_spec
from tunefleet.workers.agent import ScriptTrainer, script_arguments, script_environment
from tunefleet.workers.errors import InvalidConfig, TrialInterrupted


def script_spec(name: str = "script", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name, "task": "script", "objective": {"metric": "val_loss", "direction": "minimize"},
        "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
                         "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]}},
        "fixed": {"epochs": 4}}
    spec.update(overrides)
    return spec


# -- the spec --------------------------------------------------------------------------------------------


def test_a_script_study_takes_any_parameter_and_metric_and_needs_no_model_or_data() -> None:
    spec = validate_spec(script_spec(objective=[{"metric": "val_loss", "direction": "minimize"},
                                                {"metric": "gpu_hours", "direction": "minimize"}],
                                     search={"sampler": "tpe", "pruner": "none"}))
    assert spec.model is None and spec.data is None and spec.rungs() == [20, 60, 100]


@pytest.mark.parametrize(("spec", "loc", "says"), [
    (script_spec(search_space={"my-lr": {"type": "float", "low": 0.1, "high": 1}}), ["search_space", "my-lr"],
     "TUNEFLEET_PARAM_"),
    (script_spec(fixed={"2x": 1}), ["fixed", "2x"], "letters, digits and _"),
    (study_spec(model=None), ["model"], "required by task sequence-classification"),
    ({k: v for k, v in study_spec().items() if k != "data"}, ["data"], "only task: script may leave it out"),
])
def test_a_bad_script_spec_names_the_field_and_the_fix(spec: dict[str, Any], loc: list[str], says: str) -> None:
    with pytest.raises(SpecError) as refused:
        validate_spec({k: v for k, v in spec.items() if v is not None})
    assert any(e["loc"] == loc and says in e["msg"] for e in refused.value.errors), refused.value.errors


def test_leases_match_the_workers_tasks(server: LiveServer) -> None:
    """The built-in worker never leases a script study; the agent (tasks=["script"]) leases only those."""
    with Client(server.url) as client:
        builtin = client.create_study(study_spec("builtin", budget={"max_trials": 1}))
        script = client.create_study(script_spec(budget={"max_trials": 1}))
        agent_lease = client.lease("agent", {}, "node", tasks=["script"])
        assert agent_lease is not None and agent_lease["study_id"] == script["id"]
        assert client.lease("agent-2", {}, "node", tasks=["script"]) is None
        worker_lease = client.lease("worker", {}, "node")
        assert worker_lease is not None and worker_lease["study_id"] == builtin["id"]
        with pytest.raises(ApiError) as refused:
            client.lease("w", {}, "node", tasks=[])
        assert refused.value.status_code == 422
        with pytest.raises(ApiError) as bad_name:
            client.create_study(script_spec("bad", search_space={"a.b": {"type": "int", "low": 1, "high": 3}}))
        assert bad_name.value.status_code == 422 and "search_space" in bad_name.value.message


# -- the SDK -------------------------------------------------------------------------------------------


def test_the_sdk_imports_no_fine_tuning_library_and_speaks_the_servers_actions() -> None:
    code = "import sys, tunefleet.sdk; print(sorted(m for m in ('torch', 'transformers', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert get_args(Action) == get_args(ReportAction)


def test_the_sdk_outside_an_agent_runs_the_script_as_a_plain_program(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TUNEFLEET_AGENT_URL", "TUNEFLEET_CHECKPOINT_DIR", "TUNEFLEET_RESUME_DIR", "TUNEFLEET_TRIAL_ID"):
        monkeypatch.delenv(name, raising=False)
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"lr": 0.1}))
    monkeypatch.setenv("TUNEFLEET_PARAMS_FILE", str(params_file))
    sdk.params.cache_clear()
    try:
        assert sdk.params() == {"lr": 0.1} and sdk.trial_id() is None
        assert sdk.report(1, 0.5, max_step=3, accuracy=0.8) == "continue" and not sdk.should_stop()
        sdk.complete(val_loss=0.4)
        assert sdk.checkpoint_dir().is_dir() and sdk.resume_dir() is None
        with pytest.raises(ValueError, match="not a finite number"):
            sdk.report(1, float("nan"))
        with pytest.raises(ValueError, match="pass max_step"):
            sdk.report(150, 0.5)
    finally:
        sdk.params.cache_clear()


# -- the agent's trainer ----------------------------------------------------------------------------------


def test_placeholders_and_variables_carry_the_parameters_and_never_the_agents_token() -> None:
    params = {"lr": 0.01, "optimizer": "adam", "layers": [1, 2]}
    assert script_arguments(["train.py", "--lr={lr}", "--opt", "{optimizer}", "{layers}"], params) == [
        "train.py", "--lr=0.01", "--opt", "adam", "[1, 2]"]
    with pytest.raises(InvalidConfig, match=r"\{epochs\}.*no parameter 'epochs'"):
        script_arguments(["train.py", "--epochs", "{epochs}"], params)
    env = script_environment(params, {"TUNEFLEET_TRIAL_ID": "7"},
                             {"PATH": "/bin", "TUNEFLEET_TOKEN": "tf_secret", "TUNEFLEET_PARAM_OLD": "x"})
    assert env["TUNEFLEET_PARAM_LR"] == "0.01" and env["TUNEFLEET_PARAM_OPTIMIZER"] == "adam"
    assert env["TUNEFLEET_TRIAL_ID"] == "7" and env["PATH"] == "/bin"
    assert "TUNEFLEET_TOKEN" not in env and "TUNEFLEET_PARAM_OLD" not in env


# Reports epochs 1..4 of 4; on pause writes its epoch into the checkpoint folder and exits 0; resumed, starts
# after that epoch. Checks that the placeholder and the variable carry lr.
TRAIN = '''
import os, sys
from tunefleet import sdk
assert sys.argv[1] == os.environ["TUNEFLEET_PARAM_LR"] == str(sdk.params()["lr"])
first = int((sdk.resume_dir() / "epoch").read_text()) + 1 if sdk.resume_dir() else 1
for epoch in range(first, 5):
    loss = 1.0 / epoch
    action = sdk.report(epoch, loss, max_step=4, samples=epoch * 100, accuracy=1 - loss)
    if action == "pause":
        (sdk.checkpoint_dir() / "epoch").write_text(str(epoch))
    if action != "continue":
        sys.exit(0)
    if "{hang}" == "yes":
        import time; time.sleep(60)
sdk.complete(val_loss=loss, test_accuracy=0.7)
'''


def lease(objective: Any, **extra: Any) -> dict[str, Any]:
    return {"trial_id": 3, "params": {"lr": 0.01}, "rungs": [25, 50, 100],
            "spec": {"task": "script", "objective": objective, "fixed": {"epochs": 4}}, **extra}


def trainer(tmp_path: Path, hang: bool = False) -> ScriptTrainer:
    script = tmp_path / "train.py"
    script.write_text(TRAIN.replace("{hang}", "yes" if hang else "no"))
    return ScriptTrainer([sys.executable, str(script), "{lr}"], grace_seconds=2)


def test_a_trial_completes_with_its_objectives_reported_and_measured(tmp_path: Path) -> None:
    reports = Reports()
    objectives = [{"metric": "val_loss", "direction": "minimize"}, {"metric": "gpu_hours", "direction": "minimize"}]
    result = trainer(tmp_path).run(lease(objectives), reports, lambda: False, tmp_path / "trial")
    assert reports.percents == [25, 50, 100]  # one relay per rung, epochs 1, 2 and 4
    assert reports.calls[0][2] == {"samples": 100.0, "accuracy": 0.0}
    assert result.values == [0.25, result.extra["gpu_hours"]] and result.value is None
    assert result.validation_metrics == {"val_loss": 0.25, "accuracy": 0.75, "samples": 400}
    assert result.test_metrics == {"accuracy": 0.7}
    assert result.extra["samples_per_second"] == pytest.approx(400 / result.extra["train_seconds"], rel=0.01)
    assert (tmp_path / "trial" / "logs" / "stderr.log").exists()


def test_a_paused_trial_keeps_the_scripts_checkpoint_and_resumes_from_it(tmp_path: Path) -> None:
    objective = {"metric": "val_loss", "direction": "minimize"}
    paused = trainer(tmp_path).run(lease(objective), Reports(pause_at=50), lambda: False, tmp_path / "first")
    assert paused.paused_at == 50 and paused.checkpoint_dir is not None
    assert (paused.checkpoint_dir / "epoch").read_text() == "2"
    reports = Reports()
    resuming = lease(objective, resume_dir=str(paused.checkpoint_dir), resume={"step": 50})
    resumed = trainer(tmp_path).run(resuming, reports, lambda: False, tmp_path / "second")
    assert reports.percents == [100] and resumed.value == 0.25  # epochs 3 and 4 only


def test_a_stop_request_ends_the_process_and_interrupts_the_trial(tmp_path: Path) -> None:
    deadline = time.monotonic() + 1.0  # the study is stopped a second in
    started = time.monotonic()
    with pytest.raises(TrialInterrupted):
        trainer(tmp_path, hang=True).run(lease({"metric": "val_loss"}), Reports(), lambda: time.monotonic() > deadline,
                                         tmp_path / "trial")
    assert time.monotonic() - started < 10


# -- the docs ---------------------------------------------------------------------------------------------


def test_byo_docs_show_both_examples_as_they_are_and_the_agents_help() -> None:
    import typer

    from tunefleet.cli import app

    root = Path(__file__).resolve().parent.parent
    doc = " ".join((root / "docs" / "byo.md").read_text().split())
    for example in ("train_linear.py", "train_hf.py", "linear.yaml", "hf.yaml"):
        assert " ".join((root / "examples" / "byo" / example).read_text().split()) in doc, example
    agent = typer.main.get_command(app).commands["agent"]  # type: ignore[attr-defined]
    for param in agent.params:
        assert " ".join((param.help or "").split()) in doc, param.name
    for example in ("linear.yaml", "hf.yaml"):  # and the specs are valid
        validate_spec(parse_spec_text((root / "examples" / "byo" / example).read_text()))
