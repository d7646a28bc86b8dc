"""Pause and resume with the real worker (transformers + PEFT on a tiny BERT) against a live server on
PostgreSQL: a trial paused at 20% and resumed on a second worker after a server restart ends exactly as an
uninterrupted run; a worker SIGKILLed while writing a checkpoint; a trial paused early and promoted later."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import LiveServer, make_settings
from tunefleet.service.client import Client
from tunefleet.workers.loop import HFTrainer, WorkerLoop

LR = 3e-3


def _spec(make_spec: Callable[..., dict[str, Any]], name: str, pruner: str, method: str = "lora",
          storage: str = "auto", lrs: tuple[float, ...] = (LR,), max_trials: int = 1, seed: int = 0) -> dict[str, Any]:
    spec = make_spec(sizes=(160, 48, 48))
    spec["fixed"] = {k: v for k, v in spec["fixed"].items() if k != "learning_rate"}
    spec["fixed"].update(method=method, max_steps=20, warmup_ratio=0.1)
    spec.update(
        name=name,
        search_space={"learning_rate": {"type": "categorical", "choices": list(lrs)}},
        objective={"metric": "loss", "direction": "minimize"},  # continuous: separates configurations early
        search={"sampler": "grid", "pruner": pruner, "min_resource": 0.2, "reduction_factor": 3, "seed": seed},
        budget={"max_trials": max_trials},
        checkpoints={"storage": storage},
    )
    return spec


def _worker(client: Client, root: Path, name: str, **options: Any) -> WorkerLoop:
    # Workers of one node share a work folder (node checkpoints live beside their own folders).
    return WorkerLoop(client, HFTrainer("cpu"), worker_id=name, device="cpu", idle_sleep=0.2,
                      workdir=root / name, **{"once": True, **options})


def _uninterrupted(url: str, make_spec: Callable[..., dict[str, Any]], root: Path, method: str) -> dict[str, Any]:
    with Client(url) as client:
        study = client.create_study(_spec(make_spec, f"whole-{method}", "none", method))
        assert _worker(client, root, "whole").run() == 1
        (trial,) = client.list_trials(study["id"])["items"]
    return trial


def _assert_same_run(trial: dict[str, Any], whole: dict[str, Any]) -> None:
    assert trial["state"] == whole["state"] == "COMPLETE"
    assert trial["intermediate_values"] == pytest.approx(whole["intermediate_values"], abs=1e-6)
    assert trial["value"] == pytest.approx(whole["value"], abs=1e-6)
    assert trial["test_metrics"] == pytest.approx(whole["test_metrics"], abs=1e-6)
    assert trial["extra"]["steps_done"] == whole["extra"]["steps_done"] == 20


@pytest.mark.parametrize(("method", "where"), [("lora", "upload"), ("full", "node")])
def test_paused_at_20_and_resumed_elsewhere_after_a_server_restart_equals_an_uninterrupted_run(
        method, where, pg_url, make_spec, tmp_path) -> None:
    settings = make_settings(pg_url, tmp_path / "server", lease_seconds=8.0, reaper_interval_seconds=0.3)
    root = tmp_path / "node"
    with LiveServer(settings) as live, Client(live.url) as client:
        whole = _uninterrupted(live.url, make_spec, root, method)
        study = client.create_study(_spec(make_spec, f"paused-{method}", "asha", method))
        # The first trial of an ASHA study has no peer at 20%: it pauses there, and this worker moves on.
        assert _worker(client, root, "first", max_trials=1).run() == 1
        (paused,) = client.list_trials(study["id"])["items"]
        assert paused["state"] == "RUNNING" and paused["paused_at"] == 20 and paused["user_attrs"]["paused_at"] == 20
        assert list(paused["intermediate_values"]) == ["20"] and paused["test_metrics"] == {}
        assert client.get_study(study["id"])["counts"].items() >= {"paused": 1, "running": 0}.items()
        names = [a["name"] for a in client.list_artifacts(paused["id"])]
        assert names == (["checkpoints/step-020.tar"] if where == "upload" else [])
        if where == "node":
            assert list((root / "checkpoints" / f"trial-{paused['id']}").iterdir()) == [
                root / "checkpoints" / f"trial-{paused['id']}" / "step-020"]
    # A restarted server keeps the trial paused, never expires it, and a second worker resumes it.
    with LiveServer(settings) as live, Client(live.url) as client:
        time.sleep(settings.lease_seconds + 1)  # longer than a lease: a leased trial would have expired
        assert client.get_trial(paused["id"])["paused_at"] == 20, "the reaper leaves paused trials alone"
        assert _worker(client, root, "second").run() >= 1
        trial = client.get_trial(paused["id"])
        leftovers = [a["name"] for a in client.list_artifacts(paused["id"])]
        shown = client.get_study(study["id"])
    assert trial["worker_id"] == "second" and trial["resumes"] >= 1 and trial["paused_at"] is None
    _assert_same_run(trial, whole)
    assert not [n for n in leftovers if n.startswith("checkpoints/")], "rung checkpoints go once the trial ends"
    assert any(n.endswith("model.safetensors") for n in leftovers), "the final model stays"
    assert not (root / "checkpoints" / f"trial-{paused['id']}").exists()
    assert shown["state"] == "completed" and shown["counts"]["paused"] == 0


_DIES_ON_SECOND_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import tunefleet.workers.checkpoints as checkpoints
    import tunefleet.workers.loop as loop
    from tunefleet.cli import app

    original, calls = checkpoints.pack, []

    def pack_then_die(folder, tar_path):
        calls.append(folder)
        if len(calls) == 2:  # the checkpoint at 60%: half of it is on disk when the worker dies
            with open(tar_path, "wb") as out:
                out.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(folder, tar_path)

    loop.pack = pack_then_die
    sys.argv[0] = "tunefleet"
    app()
""")


def test_a_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(pg_url, make_spec, tmp_path):
    settings = make_settings(pg_url, tmp_path / "server", lease_seconds=8.0, reaper_interval_seconds=0.3)
    root = tmp_path / "node"
    with LiveServer(settings) as live, Client(live.url) as client:
        whole = _uninterrupted(live.url, make_spec, root, "lora")
        study = client.create_study(_spec(make_spec, "killed", "asha", "lora"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        victim = subprocess.run(
            [sys.executable, "-c", _DIES_ON_SECOND_CHECKPOINT, "worker", "--server", live.url, "--once",
             "--worker-id", "victim", "--workdir", str(root / "victim")], env=env, timeout=300, check=False)
        assert victim.returncode == -9, "the worker died of SIGKILL, in its second checkpoint"
        (trial,) = client.list_trials(study["id"])["items"]
        assert trial["state"] == "RUNNING" and sorted(trial["intermediate_values"]) == ["20", "60"]
        deadline = time.monotonic() + 30
        while client.get_trial(trial["id"])["paused_at"] is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the lease expires: the trial pauses at 60%, with its checkpoint of 20%
        assert client.get_trial(trial["id"])["paused_at"] == 60
        assert [a["name"] for a in client.list_artifacts(trial["id"])] == ["checkpoints/step-020.tar"]
        assert _worker(client, root, "rescuer").run() == 1
        done = client.get_trial(trial["id"])
    assert done["worker_id"] == "rescuer" and done["resumes"] == 2
    _assert_same_run(done, whole)


def test_a_trial_paused_early_is_promoted_when_the_rung_cut_moves(pg_url, make_spec, tmp_path) -> None:
    settings = make_settings(pg_url, tmp_path / "server", lease_seconds=10.0)
    # Learning rates from good to useless; grid seed 4 hands out the best first: it pauses at 20% (no peers
    # yet), and is promoted once the third trial's report puts it in the top third of the rung.
    lrs = (1e-2, 1e-5, 3e-5, 1e-4)
    with LiveServer(settings) as live, Client(live.url) as client:
        study = client.create_study(_spec(make_spec, "promote", "asha", "lora", lrs=lrs, max_trials=4, seed=4))
        assert _worker(client, tmp_path, "only").run() >= 4
        trials = sorted(client.list_trials(study["id"])["items"], key=lambda t: t["number"])
        shown = client.get_study(study["id"])
        with sa.create_engine(pg_url).connect() as db:
            answers = db.execute(sa.text("SELECT trial_id, step, action FROM tf_reports ORDER BY created_at")).all()
    first = trials[0]
    assert first["params"]["learning_rate"] == 1e-2, "grid order changed: pick the seed that hands out 1e-2 first"
    assert (first["id"], 20, "pause") in answers, "paused when it was alone at 20%"
    assert first["resumes"] >= 1 and first["state"] == "COMPLETE" and "100" in first["intermediate_values"]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert len(pruned) == 3 and all(max(map(int, t["intermediate_values"])) < 100 for t in pruned)
    assert shown["state"] == "completed"
    assert shown["counts"].items() >= {"complete": 1, "pruned": 3, "paused": 0}.items()
