"""The worker's pull loop: lease a trial, train it, report at each rung, complete or fail, repeat.

Torch-free: training is behind the `Trainer` protocol. `HFTrainer` adapts the real trainer
(`tunefleet.workers.training.run_trial`, imported lazily); `tunefleet.workers.simulated.SimulatedTrainer` is the
torch-free stand-in for tests and benchmarks.

What the loop promises:
- it never crashes on a lost server: the client retries with backoff, and when it gives up the loop
  logs and tries again (every write is idempotent on the server, so a repeat is harmless). The one
  exception is a `once` worker asking for work: it is a batch job that must end, so when the client's
  retries for a lease are spent it raises `ServerUnavailable` instead of waiting for the server forever;
- a background thread heartbeats every `heartbeat_interval` seconds of the lease; when the server
  answers `stop: true` (study stopped or deleted, trial no longer ours) training is asked to stop
  (pausing a study only stops new leases: running trials finish);
- SIGTERM/SIGINT ask training to stop; the trial is failed as retryable ("worker shutting down"),
  so its parameters are re-queued, and the loop exits. A second signal kills at once;
- a report answered "pause" ends training with a checkpoint, which the loop stores where the lease says
  (uploaded as an artifact of the trial, or kept on this node's disk) before it tells the server `pause`
  and asks for its next lease at once; a lease that resumes a paused trial comes with the checkpoint to
  continue from, which the loop fetches and checks (SHA-256) before training starts.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from tunefleet.service.client import (
    ApiError,
    AuthError,
    Client,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServerUnavailable,
)
from tunefleet.service.spec import gpus_per_trial
from tunefleet.workers.checkpoints import NodeCheckpoints, artifact_name, folder_digest, pack, unpack
from tunefleet.workers.errors import TrialFailed, TrialInterrupted, summarise
from tunefleet.workers.inputs import InputCache

__all__ = [
    "LOGS_FOLDER",
    "HFTrainer",
    "Outcome",
    "ReportFn",
    "Trainer",
    "TrialResult",
    "WorkerLoop",
    "default_worker_id",
    "device_info",
    "visible_gpus",
]

log = logging.getLogger("tunefleet.worker")

T = TypeVar("T")
# 500s in a row on one trial write (or, for a --once worker, on a lease) before the loop gives up on it.
MAX_SERVER_ERRORS = 3
# How often an idle worker looks for node checkpoints of trials that ended elsewhere (seconds).
CHECKPOINT_SWEEP_SECONDS = 60.0
# report(step, value, metrics) -> the server's action: "continue", "prune" or "pause".
ReportFn = Callable[[int, float, dict[str, Any]], str]
# A trainer's logs: the files it writes under this folder of the trial's folder are uploaded as artifacts of
# the trial (`logs/<name>`) however the trial ends (complete, pruned, paused or failed).
LOGS_FOLDER = "logs"


class Outcome(Protocol):
    """What a trainer returns; `tunefleet.workers.training.TrialOutcome` and `TrialResult` have this shape."""

    pruned: bool
    value: float | None
    values: list[float] | None
    validation_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    extra: dict[str, Any]
    artifact_dir: Path | None
    paused_at: int | None
    checkpoint_dir: Path | None


@dataclass
class TrialResult:
    """A plain `Outcome`, for trainers that do not bring their own."""

    pruned: bool = False
    value: float | None = None
    values: list[float] | None = None
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    artifact_dir: Path | None = None
    paused_at: int | None = None  # the rung a "pause" answer stopped training at
    checkpoint_dir: Path | None = None  # what continuing from there needs (None: the trial restarts)


class Trainer(Protocol):
    """Runs one leased trial.

    Calls `report` at each of `lease["rungs"]`: on "prune" it returns `Outcome(pruned=True)` at once; on
    "pause" it writes a checkpoint folder and returns `Outcome(paused_at=rung, checkpoint_dir=folder)`. When
    `lease["resume_dir"]` is set, it continues from that checkpoint (written by the same trainer), reporting
    only the rungs after it. Checks `should_stop()` often and raises `TrialInterrupted` when it is set; raises
    `TrialFailed` (with `reason`, `retryable`) when the parameters cannot be trained.
    """

    def run(
        self, lease: Mapping[str, Any], report: ReportFn, should_stop: Callable[[], bool], workdir: Path
    ) -> Outcome: ...


class HFTrainer:
    """The real trainer (transformers + PEFT), imported lazily; keeps one model cache across trials.

    It owns `nproc` devices (`tunefleet.workers.distributed.worker_devices`): a trial of a study with
    `resources.gpus_per_trial` N >= 2 trains on the first N of them as N DDP processes under torchrun
    (`tunefleet.workers.distributed`); any other trial trains in this process, on the first.
    """

    def __init__(self, device: str, nproc: int = 1):
        self.device, self.nproc = device, nproc
        self._cache: Any = None

    def run(
        self, lease: Mapping[str, Any], report: ReportFn, should_stop: Callable[[], bool], workdir: Path
    ) -> Outcome:
        from tunefleet.workers.model_cache import ModelCache  # torch: only in processes that train
        from tunefleet.workers.training import run_trial

        needed = gpus_per_trial(lease["spec"])
        if needed > self.nproc:  # the server leases such trials to bigger workers only; an older one may not
            raise TrialFailed(f"the trial needs {needed} devices (resources.gpus_per_trial) and this worker has "
                              f"{self.nproc}: serve the study with workers started with --nproc {needed}",
                              retryable=True)
        resume = lease.get("resume_dir")
        if needed > 1:
            from tunefleet.workers.distributed import run_distributed, worker_devices

            job = {"spec": lease["spec"], "params": lease["params"], "rungs": lease["rungs"], "resume_from": resume}
            return run_distributed(job, worker_devices(self.device, self.nproc)[:needed], report, should_stop,
                                   workdir)
        if self._cache is None:
            self._cache = ModelCache()
        return run_trial(lease["spec"], lease["params"], lease["rungs"], report, device=self.device,
                         workdir=workdir, model_cache=self._cache, should_stop=should_stop,
                         resume_from=Path(resume) if resume else None, inputs=lease.get("inputs"))


class _Heartbeat:
    """Heartbeats one trial from a daemon thread until stopped; `stop_requested` is set on `stop: true`."""

    def __init__(self, client: Client, trial_id: int, worker_id: str, interval: float):
        self.client, self.trial_id, self.worker_id, self.interval = client, trial_id, worker_id, interval
        self.stop_requested = threading.Event()
        self.reason: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop heartbeating (before the final write: the trial is about to leave RUNNING)."""
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                answer = self.client.heartbeat(self.trial_id, self.worker_id)
            except (NotFoundError, ConflictError, ForbiddenError) as exc:  # 403: not our lease token
                self._request_stop(f"the server no longer knows this lease: {exc.message}")
                return
            except ApiError as exc:  # the server is away: keep training, the lease has slack
                log.warning("trial %s: heartbeat failed (%s); will try again", self.trial_id, exc.message)
                continue
            if answer.get("stop"):
                self._request_stop(answer.get("reason") or "the server asked this trial to stop")
                return

    def _request_stop(self, reason: str) -> None:
        self.reason = reason
        log.warning("trial %s: stopping: %s", self.trial_id, reason)
        self.stop_requested.set()


class WorkerLoop:
    """Pulls trials from one server and runs them with `trainer` until told to stop.

    `max_trials` ends the loop after that many leased trials; `once` ends it at the first moment
    there is no work (otherwise it sleeps `idle_sleep` seconds and asks again), and raises when the
    server cannot be reached for a lease. Each trial runs in its own folder under `workdir`, removed
    once its artifacts are uploaded. `devices` is how many devices the trainer can give one trial: the
    server leases no trial whose study needs more (`resources.gpus_per_trial`).
    """

    def __init__(
        self,
        client: Client,
        trainer: Trainer,
        *,
        worker_id: str,
        device: str,
        max_trials: int | None = None,
        once: bool = False,
        idle_sleep: float = 2.0,
        workdir: Path,
        hostname: str | None = None,
        keep_trial_dirs: bool = False,
        cache_dir: Path | None = None,
        devices: int = 1,
        tasks: Sequence[str] | None = None,
    ):
        self.client = client
        self.trainer = trainer
        self.worker_id = worker_id
        self.device = device
        self.max_trials = max_trials
        self.once = once
        self.idle_sleep = idle_sleep
        self.workdir = Path(workdir)
        self.hostname = hostname or socket.gethostname()
        self.keep_trial_dirs = keep_trial_dirs
        self.devices = devices
        self.tasks = tasks  # the study tasks the trainer runs (None: the built-in ones)
        self.trials_run = 0
        # Checkpoints kept on this node (checkpoints.storage: node), shared by the node's workers: the
        # fleet gives them one work folder, so they live next to the per-worker folders.
        self.node_checkpoints = NodeCheckpoints(self.workdir.parent / "checkpoints")
        # Uploaded data sets and models (and remote files), by hash, shared by the node's workers likewise.
        self.inputs = InputCache(cache_dir or self.workdir.parent / "cache", client)
        # Seconds from each prune or pause answer to this worker's next lease request: how long a stopped
        # trial keeps the device from the next one (its checkpoint written and stored, for a pause).
        self.handoff_seconds: list[float] = []
        self._stopped_at: float | None = None
        self._swept_at = float("-inf")
        self._shutdown = threading.Event()
        self._device_info = device_info(device)

    # -- control --------------------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Ask the loop to stop: the running trial is interrupted and re-queued, then run() returns."""
        self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT request a shutdown; a second signal gets the default (immediate) behaviour.

        Must be called from the main thread (Python delivers signals there only).
        """

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.warning("%s received: finishing up (send it again to quit at once)", signal.Signals(signum).name)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.request_shutdown()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve trials until shutdown, `max_trials` or (with `once`) no work; returns trials run.

        Raises AuthError when the token is rejected: no retry can fix that. With `once`, raises
        ServerUnavailable when the client's retries of a lease request are spent, and ApiError after
        more than `MAX_SERVER_ERRORS` other failed lease requests in a row.
        """
        log.info("worker %s on %s serving %s", self.worker_id, self.device, self.client.base_url)
        while not self.shutting_down and (self.max_trials is None or self.trials_run < self.max_trials):
            lease = self._next_lease()
            if lease is None:
                self._sweep_node_checkpoints()
                if self.once:
                    log.info("no work left: exiting (--once)")
                    break
                self._shutdown.wait(self.idle_sleep)
                continue
            self.trials_run += 1
            self.run_trial(lease)
        log.info("worker %s done: %d trial(s)", self.worker_id, self.trials_run)
        return self.trials_run

    def _sweep_node_checkpoints(self) -> None:
        """Delete this node's checkpoints of trials that ended (paused trials a study pruned at its end, or a
        trial finished on another node after a restart); at most every CHECKPOINT_SWEEP_SECONDS, when idle."""
        if time.monotonic() - self._swept_at < CHECKPOINT_SWEEP_SECONDS and not self.once:
            return
        self._swept_at = time.monotonic()
        for trial_id in self.node_checkpoints.trial_ids():
            try:
                ended = self.client.get_trial(trial_id)["state"] in ("COMPLETE", "PRUNED", "FAIL")
            except NotFoundError:
                ended = True  # its study was deleted
            except ApiError:
                return  # the server is away: next time
            if ended:
                log.info("removing the node checkpoint of trial %s: the trial has ended", trial_id)
                self.node_checkpoints.remove(trial_id)

    def _next_lease(self) -> dict[str, Any] | None:
        # None means "no work" (or shutdown). A server that stays away is waited for, except by a --once
        # worker: it holds no trial yet, so giving up loses nothing, and a batch job must not hang.
        failures = 0
        if self._stopped_at is not None:
            self.handoff_seconds.append(time.monotonic() - self._stopped_at)
            log.info("next lease request %.2f s after the last trial was told to stop", self.handoff_seconds[-1])
            self._stopped_at = None
        while not self.shutting_down:
            try:
                return self.client.lease(self.worker_id, self._device_info, self.hostname, devices=self.devices,
                                         tasks=self.tasks)
            except AuthError:
                raise
            except ApiError as exc:
                failures += 1
                if self.once and (isinstance(exc, ServerUnavailable) or failures > MAX_SERVER_ERRORS):
                    raise  # the caller reports it (the CLI: one red line, exit status 1)
                log.warning("lease failed (%s); retrying in %.0f s", exc.message, self.idle_sleep)
                self._shutdown.wait(self.idle_sleep)
        return None

    def run_trial(self, lease: Mapping[str, Any]) -> None:
        """Run one leased trial to its end and tell the server how it ended; never raises ApiError."""
        trial_id = int(lease["trial_id"])
        trial_dir = self.workdir / f"trial-{trial_id}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log.info("trial %s (study %s #%s, attempt %s): params %s", trial_id, lease.get("study_name"),
                 lease.get("number"), lease.get("attempt", 0), lease.get("params"))
        interval = float(lease.get("heartbeat_interval") or 20)
        try:
            with _Heartbeat(self.client, trial_id, self.worker_id, interval) as heartbeat:
                self._train_and_finish(lease, trial_dir, heartbeat, started)
        finally:
            if not self.keep_trial_dirs:
                shutil.rmtree(trial_dir, ignore_errors=True)

    def _train_and_finish(self, lease: Mapping[str, Any], trial_dir: Path, heartbeat: _Heartbeat,
                          started: float) -> None:
        trial_id = int(lease["trial_id"])

        def should_stop() -> bool:
            return self.shutting_down or heartbeat.stop_requested.is_set()

        def report(step: int, value: float, metrics: dict[str, Any]) -> str:
            action = self._persist(lambda: self.client.report(trial_id, step, value, metrics), f"report {step}")
            if action is None:
                # The server refused (the trial is no longer ours: training it is wasted), or we shut down.
                action = "continue" if self.shutting_down else "prune"
            if action != "continue":
                self._stopped_at = time.monotonic()
            log.info("trial %s: step %s value %.5g%s", trial_id, step, value,
                     "" if action == "continue" else f" -> {action}")
            return action

        try:
            spec, inputs = self.inputs.resolve(lease["spec"])
            resume_dir = self._fetch_checkpoint(lease, trial_dir)
            run_lease = {**lease, "spec": spec, "inputs": inputs,
                         **({"resume_dir": str(resume_dir)} if resume_dir else {})}
            outcome = self.trainer.run(run_lease, report, should_stop, trial_dir)
        except TrialInterrupted:
            self._upload_logs(trial_id, trial_dir)
            heartbeat.stop()
            reason = "worker shutting down" if self.shutting_down else f"stopped by the server: {heartbeat.reason}"
            self._fail(trial_id, reason, retryable=True)
            return
        except AuthError:
            raise  # from the report callback: a rejected token ends the worker
        except TrialFailed as exc:
            self._upload_logs(trial_id, trial_dir)
            heartbeat.stop()
            log.error("trial %s failed (%s): %s", trial_id, type(exc).__name__, exc.reason)
            self._fail(trial_id, exc.reason, retryable=exc.retryable, kind=exc.kind)
            return
        except Exception as exc:  # a bug or an unexpected library error: report it, keep serving
            self._upload_logs(trial_id, trial_dir)
            heartbeat.stop()
            log.exception("trial %s crashed", trial_id)
            self._fail(trial_id, summarise(exc), retryable=True, kind="crash")
            return
        seconds = time.monotonic() - started
        self._upload_logs(trial_id, trial_dir)
        if outcome.paused_at is not None:
            self._pause(lease, trial_dir, outcome, heartbeat)
            log.info("trial %s paused at %s%% after %.1f s", trial_id, outcome.paused_at, seconds)
            return
        self.node_checkpoints.remove(trial_id)
        if outcome.pruned:
            log.info("trial %s pruned after %.1f s", trial_id, seconds)
            return
        self._complete(trial_id, outcome, seconds, heartbeat)

    def _upload_logs(self, trial_id: int, trial_dir: Path) -> None:
        """Upload the trainer's logs (`LOGS_FOLDER`), before the trial's final write: a resumed trial gets a
        new lease token, and only the holder's token may upload."""
        for path, name in _artifact_files(trial_dir / LOGS_FOLDER):
            self._persist(functools.partial(self.client.upload_artifact, trial_id, f"{LOGS_FOLDER}/{name}", path),
                          f"upload {LOGS_FOLDER}/{name}")

    def _fetch_checkpoint(self, lease: Mapping[str, Any], trial_dir: Path) -> Path | None:
        """The checkpoint a resumed lease continues from, checked against its SHA-256; None to start from the
        beginning. Raises TrialFailed (retryable: the trial restarts) when it cannot be had."""
        checkpoint = (lease.get("resume") or {}).get("checkpoint")
        if not checkpoint:
            return None
        trial_id = int(lease["trial_id"])
        if checkpoint.get("name"):
            tar_path = trial_dir / "resume.tar"
            try:
                digest = self.client.download_artifact_to(trial_id, checkpoint["name"], tar_path)
            except ApiError as exc:
                raise TrialFailed(f"cannot download checkpoint {checkpoint['name']}: {exc.message}",
                                  retryable=True) from exc
            folder = trial_dir / "resume"
            if digest == checkpoint["sha256"]:
                unpack(tar_path, folder)
            tar_path.unlink(missing_ok=True)
        else:
            folder = Path(checkpoint["path"])
            if checkpoint.get("node") != self.hostname or not folder.is_dir():
                raise TrialFailed(f"checkpoint {folder} of node {checkpoint.get('node')} is not on this node "
                                  f"({self.hostname})", retryable=True)
            digest = folder_digest(folder)
        if digest != checkpoint["sha256"]:
            raise TrialFailed(f"checkpoint of trial {trial_id} at step {checkpoint['step']} is corrupt (SHA-256 "
                              f"{digest}, expected {checkpoint['sha256']})", retryable=True)
        log.info("trial %s: resuming from its checkpoint at %s%%", trial_id, checkpoint["step"])
        return folder

    def _pause(self, lease: Mapping[str, Any], trial_dir: Path, outcome: Outcome, heartbeat: _Heartbeat) -> None:
        """Store the checkpoint where the lease says, then tell the server (which releases the lease). A
        checkpoint that cannot be stored is left out: the server resumes from the previous one, or restarts."""
        trial_id, step = int(lease["trial_id"]), int(outcome.paused_at or 0)
        storage, source = lease.get("checkpoint_storage"), outcome.checkpoint_dir
        checkpoint: dict[str, Any] | None = None
        if source is not None and storage == "upload":
            tar_path = trial_dir / "checkpoint.tar"
            digest, size = pack(source, tar_path)
            name = artifact_name(step)
            if self._persist(functools.partial(self.client.upload_artifact, trial_id, name, tar_path),
                             f"upload {name}") is not None:
                checkpoint = {"step": step, "sha256": digest, "size": size, "name": name}
        elif source is not None and storage == "node":
            folder, digest = self.node_checkpoints.keep(trial_id, step, source)
            checkpoint = {"step": step, "sha256": digest, "node": self.hostname, "path": str(folder)}
        heartbeat.stop()
        self._persist(lambda: self.client.pause(trial_id, step, checkpoint), "pause")

    def _complete(self, trial_id: int, outcome: Outcome, seconds: float, heartbeat: _Heartbeat) -> None:
        # Uploads may take long: the heartbeat keeps the lease alive until the final write.
        for path, name in _artifact_files(outcome.artifact_dir):
            self._persist(functools.partial(self.client.upload_artifact, trial_id, name, path), f"upload {name}")
        heartbeat.stop()
        extra = {"train_seconds": round(seconds, 3), **(outcome.extra or {})}
        self._persist(
            lambda: self.client.complete(trial_id, value=outcome.value, values=outcome.values,
                                         validation_metrics=outcome.validation_metrics,
                                         test_metrics=outcome.test_metrics, extra=extra),
            "complete",
        )
        log.info("trial %s complete: value %s in %.1f s", trial_id,
                 outcome.value if outcome.values is None else outcome.values, seconds)

    def _fail(self, trial_id: int, reason: str, *, retryable: bool, kind: str = "trial") -> None:
        log.warning("trial %s: fail (%s, retryable=%s): %s", trial_id, kind, retryable, reason)
        self._persist(lambda: self.client.fail(trial_id, reason, retryable, kind=kind), "fail")

    def _persist(self, call: Callable[[], T], what: str) -> T | None:
        """Call until the server answers: trial writes are idempotent, so repeats are safe.

        Gives up (returning None) on shutdown, when the server says the trial is not ours any more
        (404/409: pruned, expired, deleted; 403 on a trial: not our lease token), on any other 4xx, or after
        `MAX_SERVER_ERRORS` 500s. Raises AuthError on a 401: a rejected API token ends the worker.
        """
        server_errors = 0
        while True:
            try:
                return call()
            except (NotFoundError, ConflictError, ForbiddenError) as exc:  # the lease came with our token's role
                log.warning("%s: the server refused (%s); moving on", what, exc.message)
                return None
            except AuthError:
                raise
            except ServerUnavailable as exc:
                if self.shutting_down:
                    log.error("%s lost: server unreachable during shutdown (%s)", what, exc.message)
                    return None
                log.warning("%s: server unreachable (%s); retrying", what, exc.message)
            except ApiError as exc:
                # A 4xx will not change on a repeat; a 500 might be a passing database hiccup.
                server_errors += 1
                if (exc.status_code or 500) < 500 or server_errors > MAX_SERVER_ERRORS:
                    log.error("%s failed (%s); giving up: the lease will expire and the server "
                              "re-queues the trial", what, exc.message)
                    return None
                log.warning("%s: server error (%s); retrying", what, exc.message)
            self._shutdown.wait(self.idle_sleep)


def _artifact_files(artifact_dir: Path | None) -> Iterator[tuple[Path, str]]:
    """Every file under `artifact_dir` with its relative POSIX name (`adapter/adapter_model.safetensors`)."""
    if artifact_dir is None or not Path(artifact_dir).is_dir():
        return
    root = Path(artifact_dir)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path, path.relative_to(root).as_posix()


# -- devices: which device this worker trains on, described without importing torch -------------


def visible_gpus() -> list[int]:
    """Indices of the CUDA devices this process may use (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return list(range(len(entries)))
    return list(range(len(_nvidia_smi(["--query-gpu=index", "--format=csv,noheader"]))))


def device_info(device: str) -> dict[str, Any]:
    """`{"type", "name", "memory_mb"}` for the lease request; best effort, never raises."""
    if not device.startswith("cuda"):
        return {"type": "cpu", "name": socket.gethostname(), "cpus": os.cpu_count()}
    index = int(device.partition(":")[2] or 0)
    info: dict[str, Any] = {"type": "cuda", "index": index}
    # cuda:i counts visible devices; nvidia-smi counts physical ones.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = int(visible[index]) if index < len(visible) and visible[index].isdigit() else index
    rows = _nvidia_smi(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    if physical < len(rows):
        name, _, memory = rows[physical].rpartition(",")
        info.update(name=name.strip(), memory_mb=int(float(memory)) if memory.strip() else None)
    return info


def _nvidia_smi(args: list[str]) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


def default_worker_id(device: str, hostname: str | None = None, nproc: int = 1) -> str:
    """`<hostname>-<device>` (e.g. `node1-cuda0`), unique per GPU of a node; a worker of several GPUs is named
    after the first and the last (`node1-cuda2-3`)."""
    name = device.replace(":", "")
    if device.startswith("cuda") and nproc > 1:
        name = f"{name}-{int(device.partition(':')[2] or 0) + nproc - 1}"
    return f"{hostname or socket.gethostname()}-{name}"
