"""A torch-free trainer with a known objective, for tests, demos of the protocol and benchmarks.

The synthetic objective (`simulated_quality`) is a smooth function of the usual parameters with a
known optimum: LoRA-like methods peak at learning_rate 3e-4 and lora_r 16, full fine-tuning peaks
at a ten times lower learning rate (3e-5) and a slightly higher score; weight decay near 0.01 and
warmup near 0.06 help a little; unknown parameters are ignored. The learning curve at `pct` percent
of the budget is `final * (1 - exp(-k * pct / 100))`, where higher learning rates learn faster
(larger k), so early rungs rank configurations imperfectly, as real ones do. Small noise is seeded
by (params, seed): the same parameters and seed always give the same numbers, in any process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from tunefleet.service.spec import COST_METRICS, objectives_of
from tunefleet.workers.errors import TrialFailed, TrialInterrupted
from tunefleet.workers.loop import ReportFn, TrialResult

if TYPE_CHECKING:
    from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext

__all__ = [
    "SimulatedTrainer",
    "run_simulated_workers",
    "simulated_costs",
    "simulated_metric",
    "simulated_quality",
    "start_simulated_workers",
]

LORA_BEST_LR = 3e-4
FULL_BEST_LR = 3e-5
BEST_LORA_R = 16
NOISE = 0.004


@dataclass(frozen=True)
class _Curve:
    final: float  # the score at 100% of the budget, before noise
    k: float  # learning speed: higher learns faster


def _bump(x: float, centre: float, width: float) -> float:
    """1 at `centre`, falling off as a Gaussian of the distance in units of `width`."""
    return math.exp(-0.5 * ((x - centre) / width) ** 2)


def _curve(params: Mapping[str, Any]) -> _Curve:
    method = str(params.get("method", "lora"))
    full = method == "full"
    lr = float(params.get("learning_rate", FULL_BEST_LR if full else LORA_BEST_LR))
    best_lr = FULL_BEST_LR if full else LORA_BEST_LR
    lr_fit = _bump(math.log10(max(lr, 1e-12)), math.log10(best_lr), 0.5)
    score = 0.45 + 0.5 * lr_fit * (1.0 if full else 0.96)
    if not full and "lora_r" in params:
        score *= 0.9 + 0.1 * _bump(math.log2(max(float(params["lora_r"]), 1.0)), math.log2(BEST_LORA_R), 1.2)
    if "weight_decay" in params:
        score *= 0.98 + 0.02 * _bump(float(params["weight_decay"]), 0.01, 0.05)
    if "warmup_ratio" in params:
        score *= 0.98 + 0.02 * _bump(float(params["warmup_ratio"]), 0.06, 0.1)
    # Relative to its method's best rate: too high learns fast then plateaus low, too low barely moves.
    k = 1.0 + 6.0 / (1.0 + math.exp(-2.0 * math.log10(max(lr, 1e-12) / best_lr)))
    return _Curve(final=min(score, 0.99), k=k)


def _rng(params: Mapping[str, Any], seed: int, salt: str) -> random.Random:
    # Python's hash() is salted per process; a digest gives the same noise in every process.
    key = json.dumps({"p": dict(params), "s": seed, "salt": salt}, sort_keys=True, default=str)
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def simulated_quality(params: Mapping[str, Any], pct: float, seed: int = 0) -> float:
    """The score in (0, 1) at `pct` percent of the training budget; deterministic in (params, pct, seed)."""
    curve = _curve(params)
    clean = curve.final * (1.0 - math.exp(-curve.k * pct / 100.0))
    noise = _rng(params, seed, f"pct={pct:g}").gauss(0.0, NOISE)
    return min(0.999, max(0.001, clean + noise))


def simulated_metric(metric: str, direction: str, quality: float) -> float:
    """A metric named by a spec, from a quality in (0, 1): `1 - quality` for losses and minimised metrics."""
    return 1.0 - quality if metric == "loss" or direction == "minimize" else quality


def simulated_costs(params: Mapping[str, Any], seconds: float) -> dict[str, float]:
    """The cost metrics of a simulated trial that ran `seconds`: its wall time, no device-hours (no device), and
    a peak memory and throughput that follow the method as on the demo task (full fine-tuning holds about three
    times LoRA's memory, growing with lora_r, and trains about 25% slower)."""
    full = str(params.get("method", "lora")) == "full"
    memory = 1500.0 if full else 400.0 + 8.0 * float(params.get("lora_r", 8))
    return {"train_seconds": round(seconds, 3), "gpu_hours": 0.0, "peak_memory_mb": memory,
            "samples_per_second": 20.8 if full else 27.6}


def _objectives(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The spec's (metric, direction) pairs; maximized accuracy for a lease whose spec has no objective."""
    return objectives_of(spec) if spec.get("objective") else [("accuracy", "maximize")]


def _metrics(objectives: list[tuple[str, str]], quality: float) -> dict[str, float]:
    metrics = {metric: simulated_metric(metric, direction, quality) for metric, direction in objectives
               if metric not in COST_METRICS}
    metrics.setdefault("loss", simulated_metric("loss", "minimize", quality))
    return metrics


def _rung_metric(objectives: list[tuple[str, str]]) -> str:
    """What rungs report: the first objective that is not a cost (costs are known at the end only), else loss."""
    return next((m for m, _ in objectives if m not in COST_METRICS), "loss")


class SimulatedTrainer:
    """Implements `tunefleet.workers.loop.Trainer` without torch.

    - `seconds_per_rung`: wall time spent before each rung (checked for stop requests every 50 ms);
    - `fail_with`: raise at rung index `fail_at_rung` (0 = before the first report); a string means
      `TrialFailed(fail_with, retryable=fail_retryable)`, an exception is raised as given;
    - `fail_if`: a predicate of the params, so only some configurations fail (e.g. lr too high);
    - `hang`: after the first report the whole process freezes (SIGSTOP), like a hung node: no thread
      runs, so heartbeats stop and the lease expires. Use it only in a worker subprocess
      (`start_simulated_workers`); the process must then be killed with SIGKILL.
    - `write_artifacts`: write `adapter/adapter_config.json` and `trainer_log.json` for upload.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        seconds_per_rung: float = 0.0,
        fail_with: str | BaseException | None = None,
        fail_retryable: bool = False,
        fail_at_rung: int = 0,
        fail_if: Callable[[Mapping[str, Any]], bool] | None = None,
        hang: bool = False,
        write_artifacts: bool = True,
    ):
        self.seed = seed
        self.seconds_per_rung = seconds_per_rung
        self.fail_with = fail_with
        self.fail_retryable = fail_retryable
        self.fail_at_rung = fail_at_rung
        self.fail_if = fail_if
        self.hang = hang
        self.write_artifacts = write_artifacts

    def run(
        self, lease: Mapping[str, Any], report: ReportFn, should_stop: Callable[[], bool], workdir: Path
    ) -> TrialResult:
        """Report the simulated curve at each rung; stop as soon as `report` answers prune or pause (then with a
        checkpoint: a JSON file of the rung and the log so far). A lease with `resume_dir` continues after the
        checkpoint's rung."""
        params = dict(lease["params"])
        spec = lease.get("spec") or {}
        objectives = _objectives(spec)
        # Trial.report is single-objective: multi-objective studies only get the final values.
        reports = len(objectives) == 1
        started = time.monotonic()
        resumed = _read_checkpoint(lease.get("resume_dir"))
        log: list[dict[str, Any]] = resumed.get("log", [])
        for index, rung in enumerate(lease.get("rungs") or [100]):
            if rung <= resumed.get("step", 0):
                continue
            self._wait(should_stop)
            self._maybe_fail(index, params)
            quality = simulated_quality(params, rung, self.seed)
            metrics = _metrics(objectives, quality)
            log.append({"step": rung, **metrics})
            action = report(rung, metrics[_rung_metric(objectives)], metrics) if reports else "continue"
            if action == "prune":
                return TrialResult(pruned=True)
            if action == "pause":
                return TrialResult(paused_at=rung, checkpoint_dir=_write_checkpoint(workdir, rung, log))
            if self.hang:
                os.kill(os.getpid(), signal.SIGSTOP)
        return self._outcome(params, objectives, log, workdir, time.monotonic() - started)

    def _wait(self, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.seconds_per_rung
        while True:
            if should_stop():
                raise TrialInterrupted("stop requested")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(0.05, remaining))

    def _maybe_fail(self, index: int, params: Mapping[str, Any]) -> None:
        if self.fail_with is None or index != self.fail_at_rung:
            return
        if self.fail_if is not None and not self.fail_if(params):
            return
        if isinstance(self.fail_with, BaseException):
            raise self.fail_with
        raise TrialFailed(self.fail_with, retryable=self.fail_retryable)

    def _outcome(self, params: dict[str, Any], objectives: list[tuple[str, str]], log: list[dict[str, Any]],
                 workdir: Path, seconds: float) -> TrialResult:
        final = simulated_quality(params, 100, self.seed)
        # The test split is a different sample: the same quality with its own noise.
        test = min(0.999, max(0.001, final + _rng(params, self.seed, "test").gauss(-0.005, NOISE)))
        validation, costs = _metrics(objectives, final), simulated_costs(params, seconds)
        values = [{**costs, **validation}[m] for m, _ in objectives]
        artifact_dir = self._write_artifacts(params, log, workdir) if self.write_artifacts else None
        return TrialResult(
            value=values[0] if len(values) == 1 else None,
            values=values if len(values) > 1 else None,
            validation_metrics=validation,
            test_metrics=_metrics(objectives, test),
            extra={**costs, "simulated": True},
            artifact_dir=artifact_dir,
        )

    @staticmethod
    def _write_artifacts(params: dict[str, Any], log: list[dict[str, Any]], workdir: Path) -> Path:
        root = Path(workdir) / "artifacts"
        (root / "adapter").mkdir(parents=True, exist_ok=True)
        (root / "adapter" / "adapter_config.json").write_text(json.dumps({"simulated": True, **params}, indent=2))
        (root / "trainer_log.json").write_text(json.dumps(log, indent=2))
        return root


def _write_checkpoint(workdir: Path, step: int, log: list[dict[str, Any]]) -> Path:
    folder = Path(workdir) / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"step": step, "log": log}))
    return folder


def _read_checkpoint(folder: str | None) -> dict[str, Any]:
    if not folder:
        return {}
    state: dict[str, Any] = json.loads((Path(folder) / "state.json").read_text())
    return state


# -- simulated worker processes -----------------------------------------------------------------


def _worker_main(server_url: str, token: str | None, index: int, loop_options: dict[str, Any],
                 trainer_options: dict[str, Any], workdir: str, log_level: str) -> None:
    from tunefleet.service.client import AuthError, Client
    from tunefleet.workers.loop import WorkerLoop

    logging.basicConfig(level=log_level, format=f"%(asctime)s sim{index} %(levelname)s %(message)s")
    worker_id = f"{socket.gethostname()}-sim{index}"
    with Client(server_url, token) as client:
        loop = WorkerLoop(client, SimulatedTrainer(**trainer_options), worker_id=worker_id, device="cpu",
                          workdir=Path(workdir) / worker_id, **loop_options)
        loop.install_signal_handlers()
        try:
            loop.run()
        except AuthError as exc:
            logging.getLogger("tunefleet.worker").error("%s", exc.message)
            raise SystemExit(2) from None


def start_simulated_workers(
    server_url: str,
    token: str | None,
    n: int,
    *,
    max_trials: int | None = None,
    once: bool = True,
    idle_sleep: float = 0.2,
    workdir: Path | None = None,
    log_level: str = "WARNING",
    start_method: Literal["spawn", "fork", "forkserver"] = "spawn",
    **trainer_options: Any,
) -> list[BaseProcess]:
    """Start `n` worker processes running `SimulatedTrainer(**trainer_options)`; returns them running.

    `spawn` is the default start method because the caller may hold threads (a server under test)
    that `fork` would copy in an unknown state. Stop them with `terminate()` (SIGTERM: the running
    trial is re-queued) or `kill()`.
    """
    # typeshed answers any str with BaseContext, which has no Process; the context of each start method has one.
    ctx = cast("SpawnContext | ForkContext | ForkServerContext", multiprocessing.get_context(start_method))
    root = str(workdir or Path(tempfile.mkdtemp(prefix="tunefleet-sim-")))
    loop_options = {"max_trials": max_trials, "once": once, "idle_sleep": idle_sleep}
    processes: list[BaseProcess] = [
        ctx.Process(target=_worker_main, name=f"sim-worker-{i}",
                    args=(server_url, token, i, loop_options, trainer_options, root, log_level))
        for i in range(n)
    ]
    for process in processes:
        process.start()
    return processes


def run_simulated_workers(
    server_url: str, token: str | None, n: int, *, timeout: float | None = None, **options: Any
) -> list[int | None]:
    """Run `n` simulated workers until they exit (by default when no work is left); returns exit codes.

    Workers still running after `timeout` seconds are sent SIGTERM, then SIGKILL 10 s later
    (hung ones only die of SIGKILL). Takes the options of `start_simulated_workers`.
    """
    processes = start_simulated_workers(server_url, token, n, **options)
    deadline = None if timeout is None else time.monotonic() + timeout
    for process in processes:
        process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]
