"""A study whose trials keep failing for a reason of its own (model, data, config) pauses itself, says why,
and `study create --wait` exits 1; failures that depend on the parameters do not pause it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from typer.testing import CliRunner

from tests.conftest import LiveServer, study_spec
from tunefleet.cli import app
from tunefleet.service.client import Client
from tunefleet.workers.errors import DataError, ModelLoadError, NonFiniteLoss
from tunefleet.workers.loop import WorkerLoop
from tunefleet.workers.simulated import SimulatedTrainer


def _serve(url: str, trainer: SimulatedTrainer, tmp_path: Path, name: str = "w") -> int:
    """Run one worker until no study has work; returns how many trials it ran."""
    with Client(url) as client:
        return WorkerLoop(client, trainer, worker_id=name, device="cpu", once=True, idle_sleep=0.05,
                          workdir=tmp_path / name).run()


def test_three_model_failures_in_a_row_pause_the_study_with_the_reason(server: LiveServer, tmp_path: Path) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("no-model", budget={"max_trials": 20}))
        missing = ModelLoadError("cannot load model 'org/missing': not on this node and HF_HUB_OFFLINE is set")
        assert _serve(server.url, SimulatedTrainer(fail_with=missing), tmp_path) == 3, "3 trials, not 20"
        shown = client.get_study(study["id"])
        # Trials asked ahead for the next leases (QUEUED) wait in the paused study; the three that ran failed.
        trials = [t for t in client.list_trials(study["id"])["items"] if t["state"] != "QUEUED"]
    assert shown["state"] == "paused" and "model" in shown["state_reason"] and "org/missing" in shown["state_reason"]
    assert f"tunefleet study resume {study['id']}" in shown["state_reason"]
    assert [t["state"] for t in trials] == ["FAIL"] * 3 and {t["user_attrs"]["fail_kind"] for t in trials} == {"model"}
    with Client(server.url) as client:
        resumed = client.resume_study(study["id"])
        assert resumed["state"] == "running" and resumed["state_reason"] is None
        # Fixed: the next trials run.
        assert _serve(server.url, SimulatedTrainer(), tmp_path, "fixed") >= 1
        assert client.get_study(study["id"])["counts"]["complete"] >= 1


def test_failures_of_the_parameters_or_of_mixed_kinds_do_not_pause_it(server: LiveServer, tmp_path: Path) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("diverges", budget={"max_trials": 5}, baseline=None))
        assert _serve(server.url, SimulatedTrainer(fail_with=NonFiniteLoss("loss became nan")), tmp_path) == 5
        assert client.get_study(study["id"])["state"] == "completed", "every trial tried: NaN is the parameters'"
        mixed = client.create_study(study_spec("mixed", budget={"max_trials": 4}, baseline=None))
        with Client(server.url) as c:
            lease = c.lease("m", {}, "h")
            c.fail(lease["trial_id"], "no data", kind="data")
            lease = c.lease("m", {}, "h")
            c.fail(lease["trial_id"], "no model", kind="model")
            lease = c.lease("m", {}, "h")
            c.fail(lease["trial_id"], "no data", kind="data")
        assert client.get_study(mixed["id"])["state"] == "running", "three in a row, but not of one kind"


def test_create_wait_exits_1_when_the_study_pauses_itself(server: LiveServer, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(study_spec("wait-fails", budget={"max_trials": 10, "max_consecutive_failures": 2},
                                               baseline=None)))
    missing = DataError("data file data/train.jsonl not found")
    with Client(server.url) as client:
        # A worker that waits for work (the study does not exist yet when it starts).
        loop = WorkerLoop(client, SimulatedTrainer(fail_with=missing), worker_id="bg", device="cpu", once=False,
                          idle_sleep=0.05, workdir=tmp_path / "bg")
        worker = threading.Thread(target=loop.run, daemon=True)
        worker.start()
        try:
            result = CliRunner().invoke(app, ["--server", server.url, "study", "create", str(spec_file), "--wait",
                                              "--interval", "0.2"], env={"COLUMNS": "200"})
        finally:
            loop.request_shutdown()
            worker.join(30)
    assert result.exit_code == 1, result.output
    assert "paused itself" in result.output and "data/train.jsonl" in result.output
