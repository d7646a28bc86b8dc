"""The SDK for your own training script, run once per trial by `tunefleet agent` (see docs/byo.md).

    from tunefleet import sdk

    params = sdk.params()                      # {"lr": 0.01, "batch_size": 32, "epochs": 10}
    for epoch in range(1, params["epochs"] + 1):
        ...                                    # train one epoch, evaluate
        action = sdk.report(epoch, val_loss, max_step=params["epochs"], accuracy=acc)
        if action != "continue":               # "prune" or "pause": the agent stops this process
            break
    sdk.complete(val_loss=val_loss, accuracy=acc)

It imports no torch (nor anything outside the standard library): it only talks to the agent that started the
process, over a local channel (`tunefleet.sdk.protocol`). Run without an agent (`python train.py` on its own,
to debug it), `params()` reads `TUNEFLEET_PARAMS_FILE` when set and is empty otherwise, `report()` answers
continue, `complete()` does nothing and `checkpoint_dir()` is a temporary folder. `tunefleet.sdk.hf` holds
the `transformers` callback.
"""

from __future__ import annotations

import functools
import http.client
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunefleet.sdk.protocol import (
    COMPLETE_PATH,
    ENV_AGENT_TOKEN,
    ENV_AGENT_URL,
    ENV_CHECKPOINT_DIR,
    ENV_OBJECTIVE,
    ENV_PARAMS_FILE,
    ENV_RESUME_DIR,
    ENV_TRIAL_ID,
    REPORT_PATH,
    SHOULD_STOP_PATH,
    TOKEN_HEADER,
    Action,
)

__all__ = ["Action", "AgentUnavailable", "checkpoint_dir", "complete", "objective", "params", "report",
           "resume_dir", "should_stop", "trial_id"]

# Seconds to wait for the agent's answer: a report waits for the server's (the agent retries a server that
# is briefly away), so it is generous; a dead agent refuses the connection at once instead.
_TIMEOUT = 300.0
_stopping = False  # set once a report was answered prune or pause: should_stop() needs no call then


class AgentUnavailable(RuntimeError):
    """The agent that started this process no longer answers (it was killed): the trial is lost, stop."""


@functools.cache
def params() -> dict[str, Any]:
    """The trial's parameters, searched and fixed (read once); empty outside an agent without
    `TUNEFLEET_PARAMS_FILE`."""
    path = os.environ.get(ENV_PARAMS_FILE)
    if not path:
        return {}
    loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{ENV_PARAMS_FILE} ({path}) must hold a JSON object of parameter names and values")
    return loaded


def trial_id() -> int | None:
    """The trial's id on the server (for your own logs and run names); None outside an agent."""
    value = os.environ.get(ENV_TRIAL_ID)
    return int(value) if value else None


def objective() -> str | None:
    """The metric a report's `value` is: the study's (first) objective; None outside an agent."""
    return os.environ.get(ENV_OBJECTIVE) or None


def report(step: float, value: float, *, max_step: float | None = None, **metrics: float) -> Action:
    """Report the objective's `value` after `step` and the other `metrics` (numbers); answers "continue",
    "prune" (stop for good) or "pause" (write a checkpoint into `checkpoint_dir()`, then exit).

    `step` counts whatever the script counts (epochs, optimizer steps); `max_step` is the step training ends
    at, so the agent can place `step` in the study's budget (the rungs are percents of it). Without
    `max_step`, steps are percents (1..100). The agent relays the first report at or past each rung to the
    server and answers "continue" to the others at once. Report `samples` (training samples processed so
    far) to get `samples_per_second` with the result. Raises ValueError for a value or metric that is not a
    finite number (fail instead: exit non-zero), AgentUnavailable when the agent is gone.
    """
    global _stopping
    _check_finite({"value": value, "step": step, **({"max_step": max_step} if max_step is not None else {}),
                   **metrics})
    if max_step is None and step > 100:
        raise ValueError(f"report step {step} is past 100 without max_step: steps are then percents of the "
                         "training budget; pass max_step= (the step training ends at)")
    body = {"step": step, "value": value, "max_step": max_step, "metrics": metrics}
    answer = _call("POST", REPORT_PATH, body)
    action: Action = answer.get("action", "continue") if answer is not None else "continue"
    if action != "continue":
        _stopping = True
    return action


def should_stop() -> bool:
    """Whether the script should stop now: a report was answered prune or pause, the study was stopped, or
    the agent is shutting down (it stops the process itself soon after). False outside an agent."""
    if _stopping:
        return True
    answer = _call("GET", SHOULD_STOP_PATH, None)
    return bool(answer and answer.get("stop"))


def complete(value: float | None = None, **metrics: float) -> None:
    """Give the trial's final metrics (call once, at the end, then exit with status 0).

    `value` is the objective's final value; metrics named after objectives count as theirs, so
    `complete(val_loss=0.12, accuracy=0.9)` is enough. Metrics named `test_<name>` are test-set scores (the
    study report compares tuned and baseline on them); the rest are validation metrics. A script that exits
    0 without calling complete() completes with its last report. Raises ValueError for a non-finite number.
    """
    _check_finite({**({"value": value} if value is not None else {}), **metrics})
    _call("POST", COMPLETE_PATH, {"value": value, "metrics": metrics})


def checkpoint_dir() -> Path:
    """The folder to write a checkpoint into when a report is answered "pause" (exit 0 once written: the
    agent stores the folder, and the trial may resume later, maybe on another node, from `resume_dir()`)."""
    folder = os.environ.get(ENV_CHECKPOINT_DIR)
    return Path(folder) if folder else _scratch_dir()


def resume_dir() -> Path | None:
    """The checkpoint this trial resumes from (what `checkpoint_dir()` held when it paused); None when it
    starts from the beginning."""
    folder = os.environ.get(ENV_RESUME_DIR)
    return Path(folder) if folder else None


@functools.cache
def _scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tunefleet-checkpoint-"))


def _check_finite(numbers: dict[str, Any]) -> None:
    for name, number in numbers.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"{name}={number!r} is not a finite number: report numbers only (a diverged run "
                             "should exit with a non-zero status)")


def _call(method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any] | None:
    """One request to the agent's channel; None outside an agent. Raises AgentUnavailable when the agent
    does not answer, ValueError when it refuses the request (its message says why)."""
    url = os.environ.get(ENV_AGENT_URL)
    if not url:
        return None
    parts = urlsplit(url)
    # http.client rather than urllib: no proxy settings apply to the loopback channel.
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=_TIMEOUT)
    try:
        headers = {TOKEN_HEADER: os.environ.get(ENV_AGENT_TOKEN, ""), "Content-Type": "application/json"}
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        payload = json.loads(response.read() or b"{}")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise AgentUnavailable(f"the tunefleet agent at {url} does not answer ({exc}): it was stopped, so this "
                               "trial is lost; exit") from exc
    finally:
        connection.close()
    if response.status != 200:
        raise ValueError(payload.get("error") or f"the agent refused {path} ({response.status})")
    return payload if isinstance(payload, dict) else {}
