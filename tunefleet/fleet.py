"""Running workers on this node: one worker process in the foreground, or a fleet of them, one per GPU, or an
agent that runs the user's own script for each trial of a `task: script` study.

Composition code: it builds a `WorkerLoop` from the client and a trainer, and supervises worker
subprocesses (`tunefleet worker --device cuda:i`) for `tunefleet worker --gpus`.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from tunefleet.service.client import Client

__all__ = ["run_agent", "run_worker", "run_worker_fleet"]

_stderr = Console(stderr=True)


def run_worker(url: str, token: str | None, *, device: str, worker_id: str | None, max_trials: int | None,
               once: bool, simulated: bool, workdir: Path, idle_sleep: float, log_level: str,
               cache_dir: Path | None = None, nproc: int = 1) -> None:
    """Train trials from the server at `url` on `device` (and the `nproc - 1` after it) until stopped (or until
    no work, with `once`)."""
    from tunefleet.workers.loop import HFTrainer, Trainer, WorkerLoop, default_worker_id

    _log_to_stderr(log_level)
    trainer: Trainer
    if simulated:
        from tunefleet.workers.simulated import SimulatedTrainer

        trainer = SimulatedTrainer()
    else:
        importlib.import_module("tunefleet.workers.training")  # fail now, not at the first lease, without torch
        trainer = HFTrainer(device, nproc)
    with Client(url, token) as client:
        loop = WorkerLoop(client, trainer, worker_id=worker_id or default_worker_id(device, nproc=nproc),
                          device=device, max_trials=max_trials, once=once, idle_sleep=idle_sleep, workdir=workdir,
                          cache_dir=cache_dir, devices=nproc)
        loop.install_signal_handlers()
        loop.run()


def run_agent(url: str, token: str | None, command: list[str], *, grace_seconds: float, worker_id: str | None,
              max_trials: int | None, once: bool, workdir: Path, idle_sleep: float, log_level: str) -> None:
    """Run `command` for each trial of the server's `task: script` studies until stopped (or until no work,
    with `once`); see tunefleet.workers.agent."""
    from tunefleet.workers.agent import ScriptTrainer
    from tunefleet.workers.loop import WorkerLoop

    _log_to_stderr(log_level)
    trainer = ScriptTrainer(command, grace_seconds=grace_seconds)
    device = "cuda:0" if trainer.gpus else "cpu"  # what the lease request says about this node
    # Unique per process: several agents may serve one node.
    worker_id = worker_id or f"{socket.gethostname()}-agent-{os.getpid()}"
    with Client(url, token) as client:
        loop = WorkerLoop(client, trainer, worker_id=worker_id, device=device, max_trials=max_trials, once=once,
                          idle_sleep=idle_sleep, workdir=workdir, tasks=["script"])
        loop.install_signal_handlers()
        loop.run()


def _log_to_stderr(log_level: str) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=log_level.upper(), format="%(message)s",
                        handlers=[RichHandler(console=_stderr, show_path=False)])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the trial log


def run_worker_fleet(url: str, token: str | None, groups: list[list[int]], options: Mapping[str, Any]) -> int:
    """One `tunefleet worker --device cuda:i` subprocess per group of GPUs (its first GPU; `options` holds its
    --nproc); forwards SIGTERM/SIGINT, returns the worst exit status."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif value is not None:
            flags += [flag, str(value)]
    # The token travels in the environment, not argv, so `ps` does not show it.
    # A token read from --token-file travels resolved, so the children use exactly the parent's token.
    env = {**os.environ, "TUNEFLEET_SERVER": url}
    if token:
        env["TUNEFLEET_TOKEN"] = token
        env.pop("TUNEFLEET_TOKEN_FILE", None)
    # Own sessions: a terminal's Ctrl-C reaches only this parent, which forwards it once; two signals
    # would make a child quit at once instead of re-queueing its trial.
    children = [subprocess.Popen([sys.executable, "-m", "tunefleet", "worker", "--device", f"cuda:{group[0]}",
                                  *flags], env=env, start_new_session=True) for group in groups]
    _stderr.print(f"started {len(children)} workers on GPUs {', '.join('+'.join(map(str, g)) for g in groups)}")

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(abs(child.wait()) for child in children)


