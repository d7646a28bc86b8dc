"""Faults: a server killed with SIGKILL mid-study loses no finished trial, and workers carry on after it
restarts; a worker killed mid-trial has its trial re-queued and finished by another worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import free_port, study_spec
from tunefleet.service.client import Client
from tunefleet.workers.loop import WorkerLoop
from tunefleet.workers.simulated import SimulatedTrainer, start_simulated_workers


class ServerProcess:
    """`run_server` in a subprocess, so it can be killed like a real deployment."""

    def __init__(self, db_url: str, home: Path, port: int, **env: str):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "TUNEFLEET_DATABASE_URL": db_url, "TUNEFLEET_HOME": str(home),
                    "TUNEFLEET_LEASE_SECONDS": "5", "TUNEFLEET_HEARTBEAT_GRACE_SECONDS": "0",
                    "TUNEFLEET_REAPER_INTERVAL_SECONDS": "0.5", "TUNEFLEET_LOG_LEVEL": "warning", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        code = ("from tunefleet.service.api.app import run_server; "
                f"raise SystemExit(run_server('127.0.0.1', {self.port}))")
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server subprocess did not become ready")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def test_server_killed_mid_study_loses_nothing(pg_url: str, tmp_path: Path) -> None:
    # Short leases: a trial the killed server had asked for its lease queue but not yet queued is an orphan,
    # which the restarted server's reaper fails and re-queues after a lease length.
    server = ServerProcess(pg_url, tmp_path, free_port(), TUNEFLEET_LEASE_SECONDS="3").start()
    try:
        with Client(server.url, retries=30, backoff=0.2, max_backoff=1.0) as client:
            study = client.create_study(study_spec("server-kill", budget={"max_trials": 10},
                                                   search={"pruner": "none", "seed": 0}))
            loop = WorkerLoop(client, SimulatedTrainer(seconds_per_rung=0.15), worker_id="w", device="cpu",
                              once=False, idle_sleep=0.1, workdir=tmp_path / "w")
            worker = threading.Thread(target=loop.run)
            worker.start()
            while client.get_study(study["id"])["counts"]["complete"] < 3:
                time.sleep(0.1)
            before = {t["id"]: t for t in client.list_trials(study["id"])["items"] if t["state"] == "COMPLETE"}
            server.kill()  # mid-trial: the worker's calls fail and are retried with backoff
            time.sleep(1.0)
            server.start()
            deadline = time.monotonic() + 120
            while client.get_study(study["id"])["state"] != "completed" and time.monotonic() < deadline:
                time.sleep(0.2)
            loop.request_shutdown()
            worker.join(60)
            assert not worker.is_alive()
            after = {t["id"]: t for t in client.list_trials(study["id"])["items"]}
    finally:
        server.stop()
    for trial_id, trial in before.items():
        assert after[trial_id]["state"] == "COMPLETE" and after[trial_id]["value"] == trial["value"]
        assert after[trial_id]["test_metrics"] == trial["test_metrics"]
    states = [t["state"] for t in after.values()]
    assert states.count("COMPLETE") == 10 and "RUNNING" not in states, states


def test_worker_killed_mid_trial_is_requeued_and_finished_by_another(pg_url: str, tmp_path: Path) -> None:
    server = ServerProcess(pg_url, tmp_path, free_port(), TUNEFLEET_LEASE_SECONDS="2").start()
    try:
        with Client(server.url) as client:
            study = client.create_study(study_spec("worker-kill", budget={"max_trials": 3}, baseline=None,
                                                   search={"pruner": "none", "seed": 0}))
            [victim] = start_simulated_workers(server.url, None, 1, seconds_per_rung=2.0, workdir=tmp_path)
            while client.get_study(study["id"])["counts"]["running"] == 0:
                time.sleep(0.1)
            time.sleep(0.5)
            victim.kill()  # SIGKILL: no goodbye, no more heartbeats
            victim.join(10)
            killed = client.list_trials(study["id"], state="running")["items"][0]
            loop = WorkerLoop(client, SimulatedTrainer(), worker_id="rescuer", device="cpu", once=True,
                              idle_sleep=0.2, workdir=tmp_path / "rescuer")
            deadline = time.monotonic() + 60
            while client.get_trial(killed["id"])["state"] == "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.2)  # the reaper notices the silent lease
            loop.run()
            trials = client.list_trials(study["id"])["items"]
    finally:
        server.stop()
    failed = next(t for t in trials if t["id"] == killed["id"])
    assert failed["state"] == "FAIL" and "lease expired" in failed["fail_reason"]
    retry = next(t for t in trials if t["retry_of"] == killed["id"])
    assert retry["params"] == killed["params"] and retry["state"] == "COMPLETE"
    assert retry["worker_id"] == "rescuer" and retry["attempt"] == 1
    assert sum(t["state"] == "COMPLETE" for t in trials) == 3
