"""Pausing and resuming trials: the ASHA policy, the protocol (pause, resume, faults) over real HTTP on
PostgreSQL, and whole studies served by simulated worker processes."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from tests.conftest import LiveServer, make_settings, study_spec
from tunefleet.service.client import ApiError, Client, ConflictError
from tunefleet.service.scheduling import Asha, PausedTrial
from tunefleet.service.spec import checkpoint_storage
from tunefleet.service.storage import trial_storage_id
from tunefleet.workers.simulated import run_simulated_workers


def _asha_spec(name: str, **overrides: Any) -> dict[str, Any]:
    spec = study_spec(name, baseline=None, budget={"max_trials": 12},
                      search={"sampler": "random", "pruner": "asha", "min_resource": 0.2, "reduction_factor": 3,
                              "seed": 0})
    spec["search_space"] = {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}
    spec.update(overrides)
    return spec


# ---- the policy --------------------------------------------------------------------------------------------

def _study(curves: list[dict[int, float]]) -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study(direction="maximize")
    for curve in curves:
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, intermediate_values=curve))
    return study.get_trials()


def test_asha_pauses_until_a_trial_ranks_in_the_top_third_of_its_rung() -> None:
    asha = Asha([20, 60, 100], reduction_factor=3, maximize=True)
    trials = _study([{20: 0.5}])
    assert asha.answer(trials, trial_storage_id(trials[0]), 20) == "pause", "alone at the rung: no slot yet"
    trials = _study([{20: 0.5}, {20: 0.6}, {20: 0.9}])
    ids = [trial_storage_id(t) for t in trials]
    assert asha.answer(trials, ids[2], 20) == "continue", "3 reports give 1 slot, and it is the best"
    assert asha.answer(trials, ids[1], 20) == "pause"
    assert asha.answer(trials, ids[0], 100) == "continue", "the last rung is the end of training"


def test_asha_promotes_a_paused_trial_when_the_cut_moves_highest_rung_first() -> None:
    asha = Asha([20, 60, 100], reduction_factor=3, maximize=True)
    trials = _study([{20: 0.9}, {20: 0.4}, {20: 0.3, 60: 0.5}])
    ids = [trial_storage_id(t) for t in trials]
    paused = [PausedTrial(ids[0], 20), PausedTrial(ids[1], 20), PausedTrial(ids[2], 60)]
    assert asha.next_resume(trials, paused[:2], can_start_new=True, any_active=True) == ids[0]
    # Six trials at 20% give two slots: the second best is promoted too, once the best has gone on.
    more = _study([{20: 0.9, 60: 0.8}, {20: 0.8}, {20: 0.1}, {20: 0.2}, {20: 0.3}, {20: 0.4}])
    mids = [trial_storage_id(t) for t in more]
    assert asha.next_resume(more, [PausedTrial(mids[1], 20), PausedTrial(mids[5], 20)], can_start_new=True,
                            any_active=False) == mids[1]
    assert asha.next_resume(more, [PausedTrial(mids[5], 20)], can_start_new=True, any_active=False) is None


def test_asha_resumes_the_best_when_nothing_else_can_run_and_nothing_completed() -> None:
    asha = Asha([20, 60, 100], reduction_factor=3, maximize=False)  # minimize: lower is better
    trials = _study([{20: 0.5}, {20: 0.2}])
    ids = [trial_storage_id(t) for t in trials]
    paused = [PausedTrial(ids[0], 20), PausedTrial(ids[1], 20)]
    assert asha.next_resume(trials, paused, can_start_new=True, any_active=False) is None, "new trials first"
    assert asha.next_resume(trials, paused, can_start_new=False, any_active=True) is None, "wait for the active"
    assert asha.next_resume(trials, paused, can_start_new=False, any_active=False) == ids[1]


def test_checkpoint_storage_auto_uploads_adapters_and_keeps_full_models_on_the_node() -> None:
    spec = {"fixed": {"method": "lora"}}
    assert checkpoint_storage(spec, {}) == "upload"
    assert checkpoint_storage(spec, {"method": "full"}) == "node"
    assert checkpoint_storage({"checkpoints": {"storage": "none"}}, {"method": "lora"}) == "none"
    assert checkpoint_storage({}, {}) == "upload", "the default method is LoRA"


# ---- the protocol ------------------------------------------------------------------------------------------

def _upload(client: Client, trial_id: int, step: int, data: bytes = b"weights") -> dict[str, Any]:
    name = f"checkpoints/step-{step:03d}.tar"
    client.upload_artifact(trial_id, name, data)
    return {"step": step, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "name": name}


def test_pause_then_resume_hands_the_same_trial_and_its_checkpoint_to_another_worker(server: LiveServer) -> None:
    with Client(server.url) as a, Client(server.url) as b:
        study = a.create_study(_asha_spec("protocol", budget={"max_trials": 1}))
        lease = a.lease("a", {}, "node-a")
        tid = lease["trial_id"]
        assert lease["checkpoint_storage"] == "upload" and lease["resume"] is None
        with pytest.raises(ConflictError, match="was not answered pause"):
            a.pause(tid, 20)
        assert a.report(tid, 20, 0.5) == "pause"
        assert a.report(tid, 20, 0.5) == "pause", "a retry gets the stored answer"
        with pytest.raises(ApiError, match="is not uploaded"):
            a.pause(tid, 20, {"step": 20, "sha256": "0" * 64, "size": 1, "name": "checkpoints/step-020.tar"})
        checkpoint = _upload(a, tid, 20)
        paused = a.pause(tid, 20, checkpoint)
        assert paused["paused_at"] == 20 and paused["state"] == "RUNNING"
        assert a.pause(tid, 20, checkpoint)["paused_at"] == 20, "a repeat changes nothing"
        assert a.heartbeat(tid, "a")["stop"] is True
        with pytest.raises(ConflictError):
            a.report(tid, 60, 0.6)
        shown = a.get_study(study["id"])
        assert shown["counts"]["paused"] == 1 and shown["counts"]["running"] == 0
        # Nothing else can start (max_trials 1): the best paused trial is resumed, by any worker.
        resumed = b.lease("b", {}, "node-b")
        assert resumed["trial_id"] == tid and resumed["params"] == lease["params"]
        assert resumed["resume"] == {"step": 20, "promoted_through": 20, "checkpoint": checkpoint}
        assert b.download_artifact(tid, checkpoint["name"]) == b"weights"
        with pytest.raises(ApiError):
            a.report(tid, 60, 0.6)  # the old holder's token is no longer the lease's
        assert b.report(tid, 20, 0.5) == "continue", "a re-run of a rung it was promoted past goes on"
        assert b.report(tid, 60, 0.6) == "pause"
        b.pause(tid, 60, _upload(b, tid, 60, b"later"))
        names = [x["name"] for x in a.list_artifacts(tid)]
        assert names == ["checkpoints/step-060.tar"], "only the newest checkpoint is kept"
        again = a.lease("a", {}, "node-a")
        assert again["trial_id"] == tid and again["resume"]["step"] == 60
        assert a.report(tid, 100, 0.7) == "continue"
        done = a.complete(tid, value=0.7)
        assert done["state"] == "COMPLETE" and done["resumes"] == 2 and done["intermediate_values"] == {
            "20": 0.5, "60": 0.6, "100": 0.7}
        assert a.list_artifacts(tid) == [], "rung checkpoints are deleted when the trial ends"
        assert a.get_study(study["id"])["state"] == "completed"


def test_a_node_checkpoint_is_resumed_only_on_its_node(server: LiveServer) -> None:
    with Client(server.url) as client:
        client.create_study(_asha_spec("node", budget={"max_trials": 1}, checkpoints={"storage": "node"}))
        lease = client.lease("a", {}, "node-a")
        assert lease["checkpoint_storage"] == "node"
        tid = lease["trial_id"]
        assert client.report(tid, 20, 0.5) == "pause"
        client.pause(tid, 20, {"step": 20, "sha256": "a" * 64, "node": "node-a", "path": "/scratch/trial/step-020"})
        assert client.lease("b", {}, "node-b") is None, "another node cannot load it"
        assert client.lease("a2", {}, "node-a")["trial_id"] == tid


def test_checkpoints_none_never_pauses(server: LiveServer) -> None:
    with Client(server.url) as client:
        client.create_study(_asha_spec("never", checkpoints={"storage": "none"}))
        lease = client.lease("a", {}, "h")
        assert lease["checkpoint_storage"] == "none"
        assert client.report(lease["trial_id"], 20, 0.5) == "prune"


def test_a_holder_that_dies_after_a_pause_answer_leaves_the_trial_paused_at_its_last_checkpoint(
        pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, lease_seconds=1.0, reaper_interval_seconds=0.2)
    with LiveServer(settings) as live, Client(live.url) as client:
        client.create_study(_asha_spec("dies", budget={"max_trials": 1}))
        tid = client.lease("a", {}, "h")["trial_id"]
        assert client.report(tid, 20, 0.5) == "pause"
        client.pause(tid, 20, checkpoint := _upload(client, tid, 20))
        assert client.lease("a", {}, "h")["trial_id"] == tid
        assert client.report(tid, 60, 0.6) == "pause"  # ... and the worker dies writing this checkpoint
        deadline = time.monotonic() + 20
        while client.get_trial(tid)["paused_at"] != 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        trial = client.get_trial(tid)
        assert trial["paused_at"] == 60 and trial["state"] == "RUNNING", "paused, not failed"
        resumed = client.lease("b", {}, "h")
        assert resumed["resume"] == {"step": 20, "promoted_through": 60, "checkpoint": checkpoint}
        assert client.report(tid, 60, 0.6) == "continue", "the re-run of 20..60 goes on past 60"


# ---- whole studies -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_simulated_workers_run_an_asha_study_to_completion_with_promotions(
        database: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("pg_url" if database == "postgresql" else "sqlite_url")
    spec = _asha_spec("asha-sim", budget={"max_trials": 24})
    spec["search_space"]["method"] = {"type": "categorical", "choices": ["lora", "full"]}  # upload and node
    with LiveServer(make_settings(url, tmp_path / "server")) as server, Client(server.url) as client:
        study = client.create_study(spec)
        codes = run_simulated_workers(server.url, None, 4, timeout=240, workdir=tmp_path, seconds_per_rung=0.05)
        assert codes == [0, 0, 0, 0]
        shown = client.get_study(study["id"])
        trials = client.list_trials(study["id"], limit=100)["items"]
        artifacts = [a["name"] for t in trials for a in client.list_artifacts(t["id"])]
    assert shown["state"] == "completed" and len(trials) == 24
    assert {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}, "nothing failed, nothing left paused"
    reached = {step: sum(1 for t in trials if str(step) in t["intermediate_values"]) for step in (20, 60, 100)}
    assert reached[20] == 24 and reached[100] < reached[60] < reached[20]
    assert any(t["resumes"] for t in trials), "some trial paused earlier was promoted later"
    assert not [n for n in artifacts if n.startswith("checkpoints/")], "rung checkpoints are gone at the end"
    # Full fine-tuning trials kept theirs on the node; the workers swept those of ended trials on their way out.
    assert not list((tmp_path / "checkpoints").glob("trial-*"))
    used = sum(max(map(int, t["intermediate_values"])) for t in trials)
    assert used < 0.6 * 24 * 100, f"successive halving trains far less than every trial to the end ({used})"


def test_the_cli_shows_paused_trials(server: LiveServer) -> None:
    from typer.testing import CliRunner

    from tunefleet.cli import app

    with Client(server.url) as client:
        study = client.create_study(_asha_spec("cli-paused"))
        tid = client.lease("a", {}, "h")["trial_id"]
        assert client.report(tid, 20, 0.5) == "pause"
        client.pause(tid, 20)
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, ["--server", server.url, *args], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    assert "PAUSED at 20%" in cli("trial", "ls", str(study["id"]))
    assert "PAUSED at 20%" in cli("trial", "ls", str(study["id"]), "--state", "paused")
    assert "PAUSED" not in cli("trial", "ls", str(study["id"]), "--state", "running")
    assert "PAUSED at 20%" in cli("trial", "show", str(tid))
    header = next(line for line in cli("study", "ls").splitlines() if "complete" in line)
    assert "paused" in header
    assert '"paused": 1' in cli("study", "show", str(study["id"]))
