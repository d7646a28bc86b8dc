"""Multi-device trials on CPU: a real `tunefleet worker --device cpu --nproc 2` process trains a study with
`resources: {gpus_per_trial: 2}` as 2 DDP ranks (gloo) under torchrun, against a live server on PostgreSQL,
over HTTP; a one-device worker is not leased its trials, and a bad gpus_per_trial is a 422 naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, make_settings
from tunefleet.service.client import Client

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
