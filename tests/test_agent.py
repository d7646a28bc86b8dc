"""`tunefleet agent` end to end: a live server on PostgreSQL, the agent as a real subprocess, and the user's
scripts as real processes: the two examples of docs/byo.md (examples/byo/), and a script that ignores the
answers, so the agent has to stop it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import LiveServer
from tunefleet.service.client import Client
from tunefleet.service.spec import COST_METRICS, parse_spec_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "byo"
# The agent's log line when it stopped a pruned trial's process (workers/agent.py).
STOPPED = re.compile(r"trial (\d+): process stopped ([\d.]+) s after the prune answer \(([^)]+)\)")


def run_agent(url: str, command: list[str], workdir: Path, *options: str, env: dict[str, str] | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`tunefleet agent --once` until the server has no more work; its stderr holds its log."""
    argv = [sys.executable, "-m", "tunefleet", "agent", "--server", url, "--once", "--idle-sleep", "0.2",
            "--workdir", str(workdir), *options, "--", *command]
    environment = {**os.environ, "COLUMNS": "500", "HF_HUB_OFFLINE": "1", **(env or {})}  # one log line a line
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)


def example_spec(name: str, **overrides: Any) -> dict[str, Any]:
    spec = parse_spec_text((EXAMPLES / name).read_text())
    spec.update(overrides)
    return spec


def trials_by_id(client: Client, study_id: int) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in client.list_trials(study_id, limit=100)["items"]}


def stopped(agent: subprocess.CompletedProcess[str]) -> dict[int, tuple[float, str]]:
    """Trial id -> (seconds from the prune answer to the process's end, the signal that ended it or "it exited
    by itself")."""
    return {int(m[1]): (float(m[2]), m[3]) for m in STOPPED.finditer(" ".join(agent.stderr.split()))}


def test_a_plain_pytorch_script_completes_and_a_pruned_one_is_stopped(server: LiveServer, tmp_path: Path) -> None:
    with Client(server.url) as client:
        study = client.create_study(example_spec("linear.yaml", budget={"max_trials": 2}))
        bad = client.enqueue_trial(study["id"], {"lr": 0.001, "batch_size": 64})  # learns too slowly
        assert client.lease("builtin-worker", {}, "node") is None, "the built-in worker does not run scripts"

        agent = run_agent(server.url, [sys.executable, "examples/byo/train_linear.py"], tmp_path)
        assert agent.returncode == 0, agent.stderr

        trials = trials_by_id(client, study["id"])
        baseline = next(t for t in trials.values() if t["is_baseline"])
        assert baseline["state"] == "COMPLETE" and baseline["params"] == {"lr": 0.05, "batch_size": 32}
        assert baseline["value"] == baseline["validation_metrics"]["val_loss"] < 0.05
        assert sorted(map(int, baseline["intermediate_values"])) == [20, 60, 100]  # epochs 1, 3, 5 of 5
        assert set(COST_METRICS) <= set(baseline["extra"])
        assert baseline["extra"]["train_seconds"] > 0 and baseline["extra"]["samples_per_second"] > 0
        assert baseline["extra"]["peak_memory_mb"] > 50  # python with torch loaded
        stdout = client.download_artifact(baseline["id"], "logs/stdout.log").decode()
        assert "epoch 5: val_loss" in stdout

        pruned = trials[bad["id"]]
        assert pruned["state"] == "PRUNED" and list(pruned["intermediate_values"]) == ["20"]
        assert pruned["intermediate_values"]["20"] > baseline["intermediate_values"]["20"]
        assert "epoch 2" not in client.download_artifact(bad["id"], "logs/stdout.log").decode()
        seconds, how = stopped(agent)[bad["id"]]
        print(f"pruned PyTorch script ended {seconds:.3f} s after the prune answer ({how})")
        assert seconds < 2.0
        assert client.get_study(study["id"])["state"] == "completed"


def test_an_hf_trainer_script_reports_each_evaluation_through_the_callback(server: LiveServer,
                                                                           tmp_path: Path) -> None:
    spec = example_spec("hf.yaml", budget={"max_trials": 1}, fixed={"max_steps": 10})  # the baseline alone
    with Client(server.url) as client:
        study = client.create_study(spec)
        agent = run_agent(server.url, [sys.executable, "examples/byo/train_hf.py"], tmp_path)
        assert agent.returncode == 0, agent.stderr

        (trial,) = trials_by_id(client, study["id"]).values()
        assert trial["state"] == "COMPLETE", trial.get("fail_reason")
        # Evaluations every 2 of 10 steps: 20, 40, 60, 80, 100% of the budget; the study's rungs are relayed.
        assert sorted(map(int, trial["intermediate_values"])) == [20, 60, 100]
        assert trial["value"] == trial["validation_metrics"]["eval_accuracy"]
        assert {"eval_loss", "samples"} <= set(trial["validation_metrics"])
        assert trial["extra"]["samples_per_second"] > 0
        names = {a["name"] for a in client.list_artifacts(trial["id"])}
        assert {"logs/stdout.log", "logs/stderr.log"} <= names


# A test fixture, not an example: a script that ignores the agent's answers (and, in mode "deaf", SIGTERM too),
# crashes, or exits without reporting, as the parameter `mode` says.
STUBBORN = '''
import os, signal, sys, time
from pathlib import Path
from tunefleet import sdk

p = sdk.params()
Path(os.environ["PID_DIR"], f"{sdk.trial_id()}.pid").write_text(str(os.getpid()))
if p["mode"] == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if p["mode"] == "crash":
    sys.exit("cannot open data/train.csv")
if p["mode"] == "silent":
    sys.exit(0)
for step in (1, 3, 5):
    sdk.report(step, p["x"], max_step=5)  # the answer is ignored: a prune has to stop this process
    time.sleep(0.05 if p["mode"] == "good" else 60)
'''


def test_the_agent_stops_a_script_that_ignores_prune_and_maps_exit_statuses(server: LiveServer,
                                                                           tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    pids = tmp_path / "pids"
    pids.mkdir()
    spec = {"name": "stubborn", "task": "script", "objective": {"metric": "x", "direction": "minimize"},
            "search_space": {"x": {"type": "float", "low": 0, "high": 1},
                             "mode": {"type": "categorical", "choices": ["good", "stubborn", "deaf", "crash",
                                                                         "silent"]}},
            "baseline": {"x": 0.1, "mode": "good"},
            "search": {"sampler": "random", "pruner": "median", "n_startup_trials": 1},
            "budget": {"max_trials": 5}}
    with Client(server.url) as client:
        study = client.create_study(spec)
        ids = {mode: client.enqueue_trial(study["id"], {"x": 0.9, "mode": mode})["id"]
               for mode in ("stubborn", "deaf", "crash", "silent")}
        agent = run_agent(server.url, [sys.executable, str(script)], tmp_path / "work", "--grace", "1",
                          env={"PID_DIR": str(pids)})
        assert agent.returncode == 0, agent.stderr
        trials = trials_by_id(client, study["id"])

        baseline = next(t for t in trials.values() if t["is_baseline"])
        assert baseline["state"] == "COMPLETE" and baseline["value"] == 0.1  # its last report: no complete()
        times = stopped(agent)
        assert trials[ids["stubborn"]]["state"] == trials[ids["deaf"]]["state"] == "PRUNED"
        term, deaf = times[ids["stubborn"]], times[ids["deaf"]]
        print(f"script ignoring prune: stopped {term[0]:.3f} s after the answer ({term[1]}); ignoring SIGTERM "
              f"too: {deaf[0]:.3f} s ({deaf[1]}, --grace 1)")
        assert term[1] == "SIGTERM" and term[0] < 2.0
        assert deaf[1] == "SIGKILL" and 0.9 < deaf[0] < 3.0
        assert not any(psutil.pid_exists(int(p.read_text())) for p in pids.glob("*.pid"))

        crashed, silent = trials[ids["crash"]], trials[ids["silent"]]
        assert crashed["state"] == "FAIL" and "exited with status 1" in crashed["fail_reason"]
        assert "cannot open data/train.csv" in crashed["fail_reason"]  # the stderr tail
        assert b"cannot open data/train.csv" in client.download_artifact(crashed["id"], "logs/stderr.log")
        assert silent["state"] == "FAIL" and "without reporting x" in silent["fail_reason"]
        assert silent["user_attrs"]["fail_kind"] == "config"


# Pauses as the SDK says (its checkpoint: the epoch it reached) and resumes from there.
PAUSABLE = '''
import sys
from tunefleet import sdk

x = sdk.params()["x"]
first = int((sdk.resume_dir() / "epoch").read_text()) + 1 if sdk.resume_dir() else 1
print(f"starting at epoch {first}")
for epoch in range(first, 6):
    action = sdk.report(epoch, x * epoch, max_step=5)
    if action == "pause":
        (sdk.checkpoint_dir() / "epoch").write_text(str(epoch))
    if action != "continue":
        sys.exit(0)
'''


def test_a_paused_script_resumes_from_its_own_checkpoint(server: LiveServer, tmp_path: Path) -> None:
    """ASHA pauses the second trial at each rung below the last (two trials: nobody is in the top 1/3), and
    resumes it when nothing else can run; each segment continues from the checkpoint the script wrote."""
    script = tmp_path / "pausable.py"
    script.write_text(PAUSABLE)
    spec = {"name": "pausable", "task": "script", "objective": {"metric": "score", "direction": "maximize"},
            "search_space": {"x": {"type": "float", "low": 0, "high": 1}}, "baseline": {"x": 0.5},
            "search": {"sampler": "random", "pruner": "asha"}, "budget": {"max_trials": 2}}
    with Client(server.url) as client:
        study = client.create_study(spec)
        second = client.enqueue_trial(study["id"], {"x": 0.4})["id"]
        agent = run_agent(server.url, [sys.executable, str(script)], tmp_path / "work")
        assert agent.returncode == 0, agent.stderr

        trial = client.get_trial(second)
        assert trial["state"] == "COMPLETE" and trial["value"] == pytest.approx(2.0)  # 0.4 × epoch 5
        assert trial["resumes"] == 2 and sorted(map(int, trial["intermediate_values"])) == [20, 60, 100]
        assert "starting at epoch 4" in client.download_artifact(second, "logs/stdout.log").decode()
