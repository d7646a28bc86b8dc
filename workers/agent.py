"""`tunefleet agent`'s trainer: each trial of a `task: script` study runs the user's own command.

`ScriptTrainer` is a `tunefleet.workers.loop.Trainer`, so the pull loop does what it does for the built-in
worker (leases, heartbeats, a lost lease, pause storage, complete or fail); this module runs the process:
- the command once per trial, `{name}` in its arguments replaced by the parameter's value, the parameters in
  a JSON file (`TUNEFLEET_PARAMS_FILE`) and in `TUNEFLEET_PARAM_<NAME>` variables (`tunefleet.sdk.protocol`);
  its stdout and stderr go to `logs/` in the trial's folder, which the loop uploads however the trial ends;
- a local HTTP channel (`_Channel`) for `tunefleet.sdk`: the agent keeps the lease and relays the first report
  at or past each rung of the study to the server, so the script never holds the lease token, and the agent
  learns a prune or pause answer the moment the script does. Why not let the SDK call the server itself: the
  agent would then learn of a prune only at its next heartbeat, and a script ignoring the answer would run on;
- on prune, or when training must stop (study stopped, agent shutting down), SIGTERM to the process group at
  once, SIGKILL after `grace_seconds`; on pause the script first gets `grace_seconds` to write its checkpoint
  and exit by itself (a checkpoint counts only when it then exits with status 0);
- what the trial cost (`tunefleet.service.spec.COST_METRICS`): wall seconds, GPU-hours (seconds × visible
  GPUs / 3600), peak resident memory of the process tree (psutil, sampled), samples per second when the
  script reports `samples`; sent with the result, and usable as objectives;
- the exit status: 0 completes the trial with what the script passed to `complete()` or last reported (an
  objective it never reported fails the trial, kind config); non-zero fails it with the end of its stderr.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil

from tunefleet.sdk import protocol
from tunefleet.service.spec import objectives_of
from tunefleet.workers.errors import InvalidConfig, TrialFailed, TrialInterrupted
from tunefleet.workers.loop import LOGS_FOLDER, ReportFn, TrialResult, visible_gpus

__all__ = ["DEFAULT_GRACE_SECONDS", "ScriptTrainer", "script_arguments", "script_environment"]

log = logging.getLogger("tunefleet.agent")

DEFAULT_GRACE_SECONDS = 10.0
# How often the process tree's memory is sampled (seconds); also the longest a stop request waits.
SAMPLE_SECONDS = 0.2
STDERR_TAIL_CHARS = 2000
# Variables the script does not get: the agent's own API token stays with the agent.
_WITHHELD = ("TUNEFLEET_TOKEN", "TUNEFLEET_TOKEN_FILE")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ScriptFailed(TrialFailed):
    """The script ended with a non-zero status; its parameters would fail again."""


class ScriptKilled(TrialFailed):
    """Something else killed the script (the kernel's out-of-memory killer, an operator): worth a retry."""

    kind = "crash"
    retryable_default = True


def script_arguments(command: Sequence[str], params: Mapping[str, Any]) -> list[str]:
    """`command` with each `{name}` replaced by the parameter's value (strings as they are, others as JSON);
    raises InvalidConfig for a placeholder that names no parameter."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in params:
            raise InvalidConfig(f"the agent's command has {{{name}}}, but the trial has no parameter {name!r} "
                                f"(it has {', '.join(sorted(params)) or 'none'}): fix the command or the study")
        return _text(params[name])

    return [_PLACEHOLDER.sub(value, arg) for arg in command]


def script_environment(params: Mapping[str, Any], channel: Mapping[str, str], base: Mapping[str, str]
                       ) -> dict[str, str]:
    """The script's environment: `base` (the agent's) less its API token, the `channel` variables, and one
    `TUNEFLEET_PARAM_<NAME>` per parameter."""
    env = {k: v for k, v in base.items() if k not in _WITHHELD and not k.startswith(protocol.ENV_PARAM_PREFIX)}
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log artifact keeps the order of prints and tracebacks
    env.update(channel)
    env.update({protocol.ENV_PARAM_PREFIX + name.upper(): _text(v) for name, v in params.items()})
    return env


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class ScriptTrainer:
    """Runs `command` once per leased trial (see the module docstring)."""

    def __init__(self, command: Sequence[str], *, grace_seconds: float = DEFAULT_GRACE_SECONDS):
        if not command:
            raise ValueError("the agent needs a command to run")
        self.command = list(command)
        self.grace_seconds = grace_seconds
        self.gpus = len(visible_gpus())

    def run(self, lease: Mapping[str, Any], report: ReportFn, should_stop: Callable[[], bool],
            workdir: Path) -> TrialResult:
        trial_id = int(lease["trial_id"])
        params = {**(lease["spec"].get("fixed") or {}), **lease["params"]}
        objectives = [metric for metric, _ in objectives_of(lease["spec"])]
        argv = script_arguments(self.command, params)
        logs, checkpoint = workdir / LOGS_FOLDER, workdir / "checkpoint"
        logs.mkdir(parents=True, exist_ok=True)
        checkpoint.mkdir(parents=True, exist_ok=True)
        params_file = workdir / "params.json"
        params_file.write_text(json.dumps(params, indent=2), encoding="utf-8")
        # A resumed trial continues after the rung its checkpoint was taken at: its next report is past it.
        resumed_at = int((lease.get("resume") or {}).get("step") or 0) if lease.get("resume_dir") else 0
        with _Channel(lease["rungs"], report, objectives[0], should_stop, resumed_at) as channel:
            variables = {protocol.ENV_TRIAL_ID: str(trial_id), protocol.ENV_PARAMS_FILE: str(params_file),
                         protocol.ENV_OBJECTIVE: objectives[0], protocol.ENV_AGENT_URL: channel.url,
                         protocol.ENV_AGENT_TOKEN: channel.token, protocol.ENV_CHECKPOINT_DIR: str(checkpoint)}
            if lease.get("resume_dir"):
                variables[protocol.ENV_RESUME_DIR] = str(lease["resume_dir"])
            log.info("trial %s: running %s", trial_id, " ".join(argv))
            run = _Run.start(argv, script_environment(params, variables, os.environ), logs)
            stopped_by = self._supervise(trial_id, run, channel, should_stop)
        costs = self._costs(run, channel.samples)
        return self._outcome(trial_id, run, channel, stopped_by, objectives, costs, checkpoint)

    def _supervise(self, trial_id: int, run: _Run, channel: _Channel, should_stop: Callable[[], bool]) -> str | None:
        """Wait for the process to end; stop it on a prune or pause answer, or when training must stop.
        Returns what stopped it ("prune", "pause", "stop"), None when it ended by itself before any of them
        (a script often exits right after a prune or pause answer: that is still a prune or a pause)."""
        while run.alive() and channel.action is None:
            if should_stop():
                run.stop(self.grace_seconds)
                return "stop"
            channel.changed.wait(SAMPLE_SECONDS)
        if channel.action == "prune":
            how = run.stop(self.grace_seconds) if run.alive() else "it exited by itself"
            log.info("trial %s: process stopped %.2f s after the prune answer (%s)", trial_id,
                     time.monotonic() - channel.answered_at, how)
        elif channel.action == "pause" and not run.wait(self.grace_seconds):  # time to write its checkpoint
            run.stop(self.grace_seconds)
        return channel.action

    def _costs(self, run: _Run, samples: float | None) -> dict[str, float]:
        seconds = run.seconds
        costs = {"train_seconds": round(seconds, 3), "gpu_hours": round(seconds * self.gpus / 3600, 6),
                 "peak_memory_mb": round(run.peak_rss / 2**20, 1)}
        if samples is not None and seconds > 0:
            costs["samples_per_second"] = round(samples / seconds, 3)
        return costs

    def _outcome(self, trial_id: int, run: _Run, channel: _Channel, stopped_by: str | None, objectives: list[str],
                 costs: dict[str, float], checkpoint: Path) -> TrialResult:
        if stopped_by == "stop":
            raise TrialInterrupted(f"trial {trial_id}: the script was stopped")
        if stopped_by == "prune":
            return TrialResult(pruned=True)
        if stopped_by == "pause":
            kept = run.returncode == 0 and any(checkpoint.iterdir())
            if not kept:
                log.warning("trial %s: paused without a checkpoint (the script exited with status %s%s): it "
                            "restarts from the beginning if resumed", trial_id, run.returncode,
                            "" if run.returncode else " and wrote nothing")
            return TrialResult(paused_at=channel.action_rung, checkpoint_dir=checkpoint if kept else None)
        if run.returncode is not None and run.returncode < 0:
            raise ScriptKilled(f"the script was killed by {signal.Signals(-run.returncode).name} (not by the "
                               f"agent; out of memory?):\n{run.stderr_tail()}")
        if run.returncode:
            raise ScriptFailed(f"the script exited with status {run.returncode}:\n{run.stderr_tail()}")
        final = channel.final_metrics()
        found = {metric: final.get(metric, costs.get(metric)) for metric in objectives}
        missing = [metric for metric, value in found.items() if value is None]
        if missing:
            raise InvalidConfig(f"the script exited 0 without reporting {', '.join(missing)}: pass it to "
                                f"sdk.complete() or sdk.report() (it gave: {', '.join(sorted(final)) or 'nothing'})")
        test = {k.removeprefix("test_"): v for k, v in final.items() if k.startswith("test_")}
        validation = {k: v for k, v in final.items() if not k.startswith("test_")}
        numbers = [float(v) for v in found.values() if v is not None]
        single = len(numbers) == 1
        return TrialResult(value=numbers[0] if single else None, values=None if single else numbers,
                           validation_metrics=validation, test_metrics=test, extra=costs)


class _Run:
    """The script's process: started in its own session (so its whole process tree can be signalled), its
    output in files, its memory sampled while it runs."""

    def __init__(self, process: subprocess.Popen[bytes], logs: Path):
        self.process, self.logs = process, logs
        self.started = time.monotonic()
        self.ended: float | None = None
        self.peak_rss = 0

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], logs: Path) -> _Run:
        with open(logs / "stdout.log", "wb") as out, open(logs / "stderr.log", "wb") as err:
            try:
                process = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            except OSError as exc:
                raise ScriptKilled(f"cannot start {argv[0]}: {exc}") from exc
        return cls(process, logs)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def alive(self) -> bool:
        self._sample()
        if self.process.poll() is None:
            return True
        self._ended()
        return False

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the process to end by itself; whether it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(min(SAMPLE_SECONDS, max(deadline - time.monotonic(), 0)))
        return not self.alive()

    def stop(self, grace: float) -> str:
        """SIGTERM to the process group, SIGKILL after `grace` s; returns the signal that ended it."""
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
            used = "SIGTERM"
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait()
            used = "SIGKILL"
        self._ended()
        return used

    def _ended(self) -> None:
        if self.ended is None:
            self.ended = time.monotonic()
            self._signal(signal.SIGKILL)  # what the script left running in its group (data loader workers...)

    def _signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
            os.killpg(self.process.pid, signum)

    def _sample(self) -> None:
        """Add up the resident memory of the process and its descendants; keep the peak."""
        try:
            root = psutil.Process(self.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in tree:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue  # ended between the listing and the read
        self.peak_rss = max(self.peak_rss, total)

    def stderr_tail(self) -> str:
        text = (self.logs / "stderr.log").read_text(encoding="utf-8", errors="replace")
        return text[-STDERR_TAIL_CHARS:].strip() or "(nothing on stderr)"


class _Channel:
    """The local HTTP endpoint the SDK in the script talks to, for one trial (see `tunefleet.sdk.protocol`).

    Reports are mapped to percents of the budget (`step` / `max_step`) and the first at or past each of the
    study's `rungs` is relayed to the server through `relay`; the others are answered continue at once."""

    def __init__(self, rungs: Sequence[int], relay: ReportFn, objective: str, should_stop: Callable[[], bool],
                 resumed_at: int = 0):
        self.rungs, self.relay, self.objective, self.should_stop = sorted(rungs), relay, objective, should_stop
        self.token = secrets.token_urlsafe(24)
        self.changed = threading.Event()  # set when a report is answered prune or pause
        self.action: str | None = None  # that answer
        self.action_rung = 0
        self.answered_at = 0.0
        self.samples: float | None = None
        self._relayed = resumed_at  # the last rung relayed
        self._reported: dict[str, float] = {}
        self._completed: dict[str, float] | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="agent-channel", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> _Channel:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def authorised(self, token: str | None) -> bool:
        return hmac.compare_digest(token or "", self.token)

    def report(self, body: Mapping[str, Any]) -> str:
        """The answer to one report (see the class docstring); raises ValueError for a malformed one."""
        step, value, max_step = _number(body, "step"), _number(body, "value"), body.get("max_step")
        metrics = body.get("metrics") or {}
        if not isinstance(metrics, dict) or not all(_finite(v) for v in metrics.values()):
            raise ValueError("metrics must map names to finite numbers")
        percent = 100 * step / _number(body, "max_step") if max_step is not None else step
        with self._lock:
            self._reported = {**self._reported, **metrics, self.objective: value}
            if "samples" in metrics:
                self.samples = float(metrics["samples"])
            if self.action is not None:
                return self.action  # stopping already
            rung = max((r for r in self.rungs if self._relayed < r <= percent + 1e-6), default=None)
            if rung is None:
                return "continue"
            self._relayed = rung
            action = self.relay(rung, value, {k: float(v) for k, v in metrics.items()})
            if action != "continue":
                self.action, self.action_rung, self.answered_at = action, rung, time.monotonic()
                self.changed.set()
            return action

    def complete(self, body: Mapping[str, Any]) -> None:
        metrics = body.get("metrics") or {}
        if not isinstance(metrics, dict) or not all(_finite(v) for v in metrics.values()):
            raise ValueError("metrics must map names to finite numbers")
        completed = dict(metrics)
        if body.get("value") is not None:
            completed[self.objective] = _number(body, "value")
        with self._lock:
            self._completed = completed

    def final_metrics(self) -> dict[str, float]:
        """What the script passed to complete(), over what it last reported."""
        with self._lock:
            return {**self._reported, **(self._completed or {})}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: Mapping[str, Any], key: str) -> float:
    value = body.get(key)
    if not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"{key} must be a finite number, not {value!r}")
    return float(value)


def _handler(channel: _Channel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self._allowed() and self.path == protocol.SHOULD_STOP_PATH:
                self._answer(200, {"stop": channel.action is not None or channel.should_stop()})
            elif self._allowed():
                self._answer(404, {"error": f"no {self.path} here"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._allowed():
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == protocol.REPORT_PATH:
                    self._answer(200, {"action": channel.report(body)})
                elif self.path == protocol.COMPLETE_PATH:
                    channel.complete(body)
                    self._answer(200, {})
                else:
                    self._answer(404, {"error": f"no {self.path} here"})
            except (ValueError, TypeError, AttributeError) as exc:
                self._answer(400, {"error": str(exc)})

        def _allowed(self) -> bool:
            if channel.authorised(self.headers.get(protocol.TOKEN_HEADER)):
                return True
            self._answer(403, {"error": f"send this trial's {protocol.ENV_AGENT_TOKEN} in {protocol.TOKEN_HEADER}"})
            return False

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("channel: " + format, *args)

    return Handler
