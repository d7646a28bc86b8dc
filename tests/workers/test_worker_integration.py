"""The real worker (transformers + PEFT on a tiny BERT) against a live server on PostgreSQL, over HTTP:
pruning at the 20% rung, adapters uploaded, a SIGKILLed worker's trial re-queued and finished by another
worker, and OOM / NaN failing the trial but not the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer

from tests.conftest import LiveServer, make_settings
from tunefleet.service.client import Client
from tunefleet.workers.loop import HFTrainer, WorkerLoop


def _spec(make_spec: Callable[..., dict[str, Any]], name: str, **overrides: Any) -> dict[str, Any]:
    spec = make_spec(sizes=(160, 48, 48))
    spec["fixed"] = {k: v for k, v in spec["fixed"].items() if k not in ("learning_rate", "method")}
    spec["fixed"]["max_steps"] = 20
    spec.update(
        name=name,
        search_space={"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                      "method": {"type": "categorical", "choices": ["lora", "full"]}},
        baseline={"learning_rate": 3e-3, "method": "full"},
        # Validation loss separates configurations already at 20% (accuracy is still at chance for all).
        objective={"metric": "loss", "direction": "minimize"},
        search={"sampler": "random", "pruner": "successive_halving", "min_resource": 0.2, "seed": 1},
        budget={"max_trials": 6},
    )
    spec.update(overrides)
    return spec


@pytest.fixture
def live(pg_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(make_settings(pg_url, tmp_path / "server", lease_seconds=8.0,
                                  reaper_interval_seconds=0.3)) as server:
        yield server


def _worker(client: Client, tmp_path: Path, name: str = "cpu-worker") -> WorkerLoop:
    return WorkerLoop(client, HFTrainer("cpu"), worker_id=name, device="cpu", once=True, idle_sleep=0.2,
                      workdir=tmp_path / name)


def test_study_prunes_at_20_percent_and_completes_with_metrics_and_adapters(live, make_spec, tmp_path) -> None:
    with Client(live.url) as client:
        study = client.create_study(_spec(make_spec, "tiny-study"))
        assert _worker(client, tmp_path).run() == 6
        trials = client.list_trials(study["id"])["items"]
        artifacts = {t["id"]: [a["name"] for a in client.list_artifacts(t["id"])] for t in trials}
        shown = client.get_study(study["id"])
    assert shown["state"] == "completed" and len(trials) == 6
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert any(list(t["intermediate_values"]) == ["20"] for t in pruned), "one trial pruned at the 20% rung"
    assert complete and len(pruned) + len(complete) == 6
    for t in complete:
        assert set(t["validation_metrics"]) >= {"accuracy", "f1_macro", "loss"}
        assert t["test_metrics"]["n_examples"] == 48 and 0 <= t["test_metrics"]["accuracy"] <= 1
        assert t["intermediate_values"]["100"] == pytest.approx(t["value"])
        assert "adapter_model.safetensors" in " ".join(artifacts[t["id"]]) or \
            "model.safetensors" in " ".join(artifacts[t["id"]])
        assert "trainer_log.json" in artifacts[t["id"]]
        assert t["extra"]["samples_per_second"] > 0
    for t in pruned:
        assert t["test_metrics"] == {} and artifacts[t["id"]] == []


def test_sigkilled_worker_trial_is_requeued_and_finished_by_another(live, make_spec, tmp_path) -> None:
    with Client(live.url) as client:
        spec = _spec(make_spec, "kill-study", budget={"max_trials": 2}, baseline=None,
                     search={"sampler": "random", "pruner": "none", "seed": 0})
        spec["fixed"]["max_steps"] = 200  # long enough to be killed mid-training
        study = client.create_study(spec)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        victim = subprocess.Popen([sys.executable, "-m", "tunefleet", "worker", "--server", live.url, "--once",
                                   "--worker-id", "victim", "--workdir", str(tmp_path / "victim")], env=env)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                running = client.list_trials(study["id"], state="running")["items"]
                if running and running[0]["intermediate_values"]:
                    break  # trained past its first rung: mid-trial
                time.sleep(0.2)
            else:
                pytest.fail("the victim never reached its first rung")
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
        finally:
            if victim.poll() is None:
                victim.kill()
        killed = running[0]
        deadline = time.monotonic() + 60
        while client.get_trial(killed["id"])["state"] == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _worker(client, tmp_path, "rescuer").run() == 2
        trials = client.list_trials(study["id"])["items"]
    failed = next(t for t in trials if t["id"] == killed["id"])
    assert failed["state"] == "FAIL" and "lease expired" in failed["fail_reason"]
    retry = next(t for t in trials if t["retry_of"] == killed["id"])
    assert retry["params"] == killed["params"] and retry["state"] == "COMPLETE" and retry["worker_id"] == "rescuer"


def test_oom_and_nan_fail_the_trial_not_the_worker(live, make_spec, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    original = Trainer.training_step

    def flaky_step(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # the first trial's first step: a CUDA OOM, as a too-large batch would give
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", flaky_step)
    with Client(live.url) as client:
        spec = _spec(make_spec, "faults", budget={"max_trials": 3},
                     search_space={"learning_rate": {"type": "categorical", "choices": [3e-3, 1e12]}},
                     baseline={"learning_rate": 3e-3},
                     search={"sampler": "grid", "pruner": "none", "seed": 0})
        spec["fixed"].update(method="full", max_grad_norm=0.0, num_epochs=3)
        spec["fixed"].pop("max_steps")
        study = client.create_study(spec)
        worker = _worker(client, tmp_path)
        assert worker.run() == 3, "the worker served every trial"
        trials = sorted(client.list_trials(study["id"])["items"], key=lambda t: t["number"])
    reasons = [t["fail_reason"] or "" for t in trials]
    assert trials[0]["state"] == "FAIL" and "out of memory" in reasons[0].lower()
    nan = [t for t in trials if t["params"]["learning_rate"] == 1e12]
    assert nan and all(t["state"] == "FAIL" for t in nan)
    assert any("nan" in r.lower() or "finite" in r.lower() for r in reasons)
    assert not [t for t in trials if t["retry_of"] is not None], "OOM and NaN are not retried"
    assert any(t["state"] == "COMPLETE" for t in trials), "the worker kept serving after the failures"
