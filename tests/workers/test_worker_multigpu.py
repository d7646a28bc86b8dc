"""Multi-device trials on CPU: a real `tunefleet worker --device cpu --nproc 2` process trains a study with
`resources: {gpus_per_trial: 2}` as 2 DDP ranks (gloo) under torchrun, against a live server on PostgreSQL,
over HTTP; a one-device worker is not leased its trials, and a bad gpus_per_trial is a 422 naming the field."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, wait_until
from tunefleet.service.client import Client
from tunefleet.workers.loop import HFTrainer, WorkerLoop

GOOD_LR, BAD_LR = 3e-3, 0.3


def _spec(make_spec: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    spec = make_spec(sizes=(160, 48, 48))
    spec["fixed"] = {k: v for k, v in spec["fixed"].items() if k != "learning_rate"}
    spec["fixed"].update(method="full", max_steps=10)
    spec.update(
        name="two-ranks",
        search_space={"learning_rate": {"type": "categorical", "choices": [GOOD_LR, BAD_LR]}},
        baseline={"learning_rate": GOOD_LR},
        # Validation loss separates the two learning rates at 20%: the finished baseline's value there prunes the
        # second trial (grid seed 1 hands out BAD_LR after the baseline).
        objective={"metric": "loss", "direction": "minimize"},
        search={"sampler": "grid", "pruner": "median", "n_startup_trials": 1, "min_resource": 0.2, "seed": 1},
        budget={"max_trials": 2},
        resources={"gpus_per_trial": 2},
    )
    return spec


def test_a_two_rank_worker_completes_one_trial_and_prunes_another(pg_url, make_spec, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path / "server", lease_seconds=10.0)
    with LiveServer(settings) as live, Client(live.url) as client:
        study = client.create_study(_spec(make_spec))
        assert client.lease("one-device", {"type": "cpu"}, "node") is None, "a 1-device worker gets no 2-rank trial"
        started = time.monotonic()
        worker = subprocess.run(
            [sys.executable, "-m", "tunefleet", "worker", "--server", live.url, "--device", "cpu", "--nproc", "2",
             "--once", "--worker-id", "ddp", "--workdir", str(tmp_path / "node" / "ddp")],
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, check=False, capture_output=True, text=True)
        seconds = time.monotonic() - started
        assert worker.returncode == 0, worker.stderr[-4000:]
        trials = sorted(client.list_trials(study["id"])["items"], key=lambda t: t["number"])
        artifacts = [a["name"] for a in client.list_artifacts(trials[0]["id"])]
        shown = client.get_study(study["id"])
    print(f"2 trials on 2 CPU ranks: {seconds:.1f} s")
    baseline, pruned = trials
    assert shown["state"] == "completed" and [t["worker_id"] for t in trials] == ["ddp", "ddp"]
    assert baseline["state"] == "COMPLETE" and baseline["params"]["learning_rate"] == GOOD_LR
    assert baseline["extra"]["world_size"] == 2, "trained by 2 DDP ranks"
    # The study's device-hours count lease time × gpus_per_trial on any device; a trial's gpu_hours is 0 on CPU.
    assert shown["gpu_hours"] > 0 and baseline["extra"]["gpu_hours"] == 0.0
    # 10 steps × 16 examples on each of the 2 ranks
    assert baseline["extra"]["samples_trained"] == 320 and baseline["extra"]["steps_done"] == 10
    assert baseline["value"] == pytest.approx(baseline["intermediate_values"]["100"])
    assert set(baseline["validation_metrics"]) >= {"accuracy", "loss"}
    assert baseline["test_metrics"]["n_examples"] == 48 and 0 <= baseline["test_metrics"]["accuracy"] <= 1
    assert "model.safetensors" in artifacts and "trainer_log.json" in artifacts
    assert pruned["state"] == "PRUNED" and list(pruned["intermediate_values"]) == ["20"]
    assert pruned["intermediate_values"]["20"] > baseline["intermediate_values"]["20"]
    assert pruned["test_metrics"] == {}
    assert "2 ranks under torchrun" in worker.stderr


@pytest.mark.parametrize("value", [0, -1, "two"])
def test_a_bad_gpus_per_trial_is_a_422_naming_the_field(server: LiveServer, make_spec, value: Any) -> None:
    spec = {**_spec(make_spec), "resources": {"gpus_per_trial": value}}
    answer = httpx.post(f"{server.url}/api/v1/studies", json=spec)
    assert answer.status_code == 422
    (error,) = answer.json()["detail"]
    assert error["loc"][-2:] == ["resources", "gpus_per_trial"]


def test_a_lease_request_offering_no_device_is_a_422(server: LiveServer) -> None:
    answer = httpx.post(f"{server.url}/api/v1/leases", json={"worker_id": "w", "devices": 0})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"][-1] == "devices"


def _worker(client: Client, root: Path, name: str, **options: Any) -> WorkerLoop:
    return WorkerLoop(client, HFTrainer("cpu", nproc=2), worker_id=name, device="cpu", devices=2, idle_sleep=0.2,
                      workdir=root / name, **{"once": True, **options})


@pytest.mark.slow
def test_a_two_rank_trial_paused_at_20_and_resumed_equals_an_uninterrupted_one(pg_url, make_spec, tmp_path) -> None:
    settings = make_settings(pg_url, tmp_path / "server", lease_seconds=10.0)
    spec = {**_spec(make_spec), "search_space": {"learning_rate": {"type": "categorical", "choices": [GOOD_LR]}},
            "budget": {"max_trials": 1}, "baseline": None}
    spec["fixed"]["method"] = "lora"
    with LiveServer(settings) as live, Client(live.url) as client:
        whole_study = client.create_study({**spec, "name": "whole", "search": {"sampler": "grid", "pruner": "none"}})
        assert _worker(client, tmp_path, "whole").run() == 1
        (whole,) = client.list_trials(whole_study["id"])["items"]
        # The first trial of an ASHA study has no peer at 20%: rank 0 checkpoints there and every rank stops.
        study = client.create_study({**spec, "name": "paused", "search": {"sampler": "grid", "pruner": "asha"}})
        assert _worker(client, tmp_path, "first", max_trials=1).run() == 1
        (paused,) = client.list_trials(study["id"])["items"]
        assert paused["paused_at"] == 20
        assert [a["name"] for a in client.list_artifacts(paused["id"])] == ["checkpoints/step-020.tar"]
        assert _worker(client, tmp_path, "second").run() >= 1  # alone, it pauses at 60% too, and resumes
        resumed = client.get_trial(paused["id"])
    assert whole["state"] == resumed["state"] == "COMPLETE" and resumed["resumes"] >= 1
    assert resumed["intermediate_values"] == pytest.approx(whole["intermediate_values"], abs=1e-6)
    assert resumed["test_metrics"] == pytest.approx(whole["test_metrics"], abs=1e-6)
    assert resumed["extra"]["world_size"] == 2 and resumed["extra"]["steps_done"] == 10


def _ranks_mid_trial(client: Client, url: str, make_spec: Callable[..., dict[str, Any]], tmp_path: Path
                     ) -> tuple[dict[str, Any], subprocess.Popen[bytes], dict[str | None, Any]]:
    """A `--nproc 2` worker process past the first rung of a long trial: (study, worker, {RANK: process}), where
    torchrun is the process without a RANK."""
    import psutil

    spec = {**_spec(make_spec), "search": {"sampler": "grid", "pruner": "none", "seed": 1}, "baseline": None,
            "budget": {"max_trials": 1}}
    spec["fixed"]["max_steps"] = 400  # long enough to be stopped mid-training
    study = client.create_study(spec)
    worker = subprocess.Popen(
        [sys.executable, "-m", "tunefleet", "worker", "--server", url, "--device", "cpu", "--nproc", "2",
         "--max-trials", "1", "--worker-id", "ddp", "--workdir", str(tmp_path / "ddp")],
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_until("the first rung", lambda: (client.list_trials(study["id"])["items"] or [{}])[0].get(
        "intermediate_values"), timeout=240)
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(worker.pid).children(recursive=True)
             if "tunefleet.workers.distributed" in " ".join(p.cmdline())}
    assert set(ranks) == {None, "0", "1"}
    return study, worker, ranks


def _ended_and_requeued(client: Client, study: dict[str, Any], ranks: dict[str | None, Any]) -> dict[str, Any]:
    """The study's failed trial, once its parameters were re-queued and no process of its group is left."""
    import psutil

    trials = client.list_trials(study["id"])["items"]
    failed = next(t for t in trials if t["state"] == "FAIL")
    assert [t["retry_of"] for t in trials if t is not failed] == [failed["id"]], "retryable: its parameters re-queued"
    assert not [p for p in ranks.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "none outlives it"
    return failed


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["kill rank 1", "SIGTERM the worker"])
def test_a_rank_that_dies_or_a_worker_told_to_stop_ends_every_rank(pg_url, make_spec, tmp_path, stop) -> None:
    settings = make_settings(pg_url, tmp_path / "server", lease_seconds=10.0)
    with LiveServer(settings) as live, Client(live.url) as client:
        study, worker, ranks = _ranks_mid_trial(client, live.url, make_spec, tmp_path)
        try:
            if stop == "kill rank 1":
                ranks["1"].kill()
            else:
                worker.send_signal(signal.SIGTERM)
            assert worker.wait(120) == 0, "the worker ends the trial and exits (--max-trials 1, or SIGTERM)"
        finally:
            if worker.poll() is None:
                worker.kill()
        failed = _ended_and_requeued(client, study, ranks)
    assert failed["worker_id"] == "ddp"
    assert ("a rank died" if stop == "kill rank 1" else "worker shutting down") in failed["fail_reason"]


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0,2", "--nproc", "2"], "each worker needs 2 consecutive GPUs, and 0,2 are not"),
    (["--gpus", "0,1,2", "--nproc", "2"], "each worker needs 2 consecutive GPUs, and 2 are not"),
    (["--nproc", "0"], "Invalid value for '--nproc'"),
])
def test_worker_flags_that_cannot_make_whole_workers_are_refused(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from tunefleet.cli import app

    result = CliRunner().invoke(app, ["worker", "--server", "http://127.0.0.1:9", *args], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and message in result.output
