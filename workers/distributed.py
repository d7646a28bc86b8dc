"""Multi-device trials: one trial trained by N local processes (DDP) under torchrun, driven by the worker.

A study with `resources.gpus_per_trial: N` (N >= 2) is leased only to workers that own N devices
(`tunefleet worker --nproc N`). The worker process stays the only one that talks to the server: it writes
the trial's job file, launches `python -m torch.distributed.run --nproc-per-node N -m
tunefleet.workers.distributed TRIAL_DIR` (ranks on cuda:0..N-1 of the trial's GPUs, or N CPU processes
with gloo) and serves rank 0 over a loopback socket, while its heartbeat thread keeps the lease. Every rank
runs the same `run_trial` as a one-device worker; the HF Trainer does DDP by itself under torchrun.
What the ranks must agree on goes through a collective, so they never part ways mid-step:
- stop: after each optimizer step rank 0 asks the worker whether to stop (worker shutting down, server
  said stop), and the answer is all-reduced, so every rank stops at the same step;
- report: the rung's metrics are already gathered from every rank by the evaluation; rank 0 sends them to the
  worker, which reports them to the server, and the answer (continue, prune, pause) is broadcast from rank 0;
- pause: the Trainer saves the checkpoint (model and optimizer from rank 0, each rank's RNG state) in the
  trial's folder, from which all N ranks of a resumed trial continue;
- the result: rank 0 writes `outcome.json` (its validation and test metrics, the artifact it saved); a rank
  that fails writes `error-<rank>.json` and exits non-zero.
A rank that dies ends the others: torchrun (`--max-restarts 0`) stops the group, the worker reads why (or
that a rank died without saying) and fails the trial as the one-device path would; a torchrun still running
when the worker gives up on the trial is stopped, then killed.

The worker's side (`run_distributed`) imports no torch; `python -m tunefleet.workers.distributed` is the
rank's side.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunefleet.workers.errors import TrialFailed, TrialInterrupted, summarise
from tunefleet.workers.loop import ReportFn, TrialResult

__all__ = ["main", "run_distributed", "worker_devices"]

log = logging.getLogger("tunefleet.worker")

JOB_FILE = "job.json"
OUTCOME_FILE = "outcome.json"
ACTIONS = ("continue", "prune", "pause")
# Seconds torchrun gets to stop its ranks on SIGTERM before it is killed.
STOP_GRACE_SECONDS = 30.0
_POLL_SECONDS = 0.2


def worker_devices(device: str, nproc: int) -> list[str]:
    """The devices of a worker started with `--device DEVICE --nproc N`: N CPU processes, or cuda:K..K+N-1."""
    if device == "cpu":
        return ["cpu"] * nproc
    first = int(device.partition(":")[2] or 0)
    return [f"cuda:{first + i}" for i in range(nproc)]


# -- the worker's side --------------------------------------------------------------------------------


def run_distributed(job: Mapping[str, Any], devices: Sequence[str], report: ReportFn,
                    should_stop: Callable[[], bool], workdir: Path) -> TrialResult:
    """Train one leased trial on `devices` (one rank each) and return rank 0's outcome.

    `job` holds what `run_trial` takes (spec, params, rungs, resume_from). Calls `report` for rank 0's rungs and
    polls `should_stop` for every step, from this thread. Raises TrialInterrupted when the ranks stopped on
    request, and TrialFailed (a rank's own reason and kind, or retryable "crash" when a rank died).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in (workdir / OUTCOME_FILE, *workdir.glob("error-*.json")):  # of an earlier segment (kept dirs)
        stale.unlink(missing_ok=True)
    with _listener() as listener:
        secret = secrets.token_hex(16)
        job_file = workdir / JOB_FILE
        job_file.write_text(json.dumps({**job, "device": "cpu" if devices[0] == "cpu" else "cuda",
                                        "port": listener.getsockname()[1], "secret": secret,
                                        "log_level": logging.getLogger().getEffectiveLevel()}))
        job_file.chmod(0o600)  # the secret admits rank 0 to this worker's socket, and no one else
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc-per-node", str(len(devices)), "--max-restarts", "0",
                   "--module", "tunefleet.workers.distributed", str(workdir)]
        log.info("training on %s: %d ranks under torchrun", ", ".join(devices), len(devices))
        # Its own session: a Ctrl-C in the worker's terminal reaches the worker only, which stops the ranks
        # at a step boundary (via should_stop) instead of killing them mid-write.
        proc = subprocess.Popen(command, env=_rank_env(devices), start_new_session=True)
        try:
            _serve(listener, secret, proc, report, should_stop)
        finally:
            _stop(proc)
    return _result(proc.returncode or 0, workdir, len(devices))


@contextmanager
def _listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        yield listener


def _rank_env(devices: Sequence[str]) -> dict[str, str]:
    """The environment of torchrun and its ranks: the trial's GPUs only (rank i trains on cuda:i), and the
    CPU cores shared between the ranks."""
    env = dict(os.environ)
    if devices[0] != "cpu":
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        indices = [int(d.partition(":")[2] or 0) for d in devices]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if i < len(visible) else str(i) for i in indices)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    return env


def _serve(listener: socket.socket, secret: str, proc: subprocess.Popen[bytes], report: ReportFn,
           should_stop: Callable[[], bool]) -> None:
    """Answer rank 0's questions (stop? and rung reports) until torchrun exits."""
    conn: socket.socket | None = None
    reader: Any = None
    try:
        while proc.poll() is None:
            if conn is None:
                if select.select([listener], [], [], _POLL_SECONDS)[0]:
                    conn, reader = _accept(listener, secret)
                continue
            if not select.select([conn], [], [], _POLL_SECONDS)[0]:
                continue
            line = reader.readline()
            if not line:  # rank 0 is done with us (or died: torchrun tells)
                conn.close()
                conn = None
                continue
            conn.sendall((json.dumps(_answer(json.loads(line), report, should_stop)) + "\n").encode())
    finally:
        if conn is not None:
            conn.close()


def _accept(listener: socket.socket, secret: str) -> tuple[socket.socket | None, Any]:
    """Rank 0's connection, once it has shown the job's secret; (None, None) for anything else."""
    conn, _ = listener.accept()
    conn.settimeout(10)
    reader = conn.makefile("r", encoding="utf-8")
    try:
        shown = json.loads(reader.readline() or "{}").get("secret")
    except (OSError, ValueError):
        shown = None
    if not isinstance(shown, str) or not secrets.compare_digest(shown, secret):
        conn.close()
        return None, None
    conn.settimeout(None)
    return conn, reader


def _answer(message: Mapping[str, Any], report: ReportFn, should_stop: Callable[[], bool]) -> dict[str, Any]:
    if message.get("op") == "report":
        return {"action": report(int(message["step"]), float(message["value"]), dict(message["metrics"]))}
    return {"stop": bool(should_stop())}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End torchrun if it still runs: SIGTERM (it stops its ranks), then SIGKILL after STOP_GRACE_SECONDS."""
    if proc.poll() is not None:
        return
    log.warning("stopping the training processes (torchrun pid %s)", proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _result(returncode: int, workdir: Path, nproc: int) -> TrialResult:
    """Rank 0's outcome; raises what the ranks reported instead, or that a rank died without a word."""
    outcome_file = workdir / OUTCOME_FILE
    if returncode == 0 and outcome_file.is_file():
        data = json.loads(outcome_file.read_text())
        for key in ("artifact_dir", "checkpoint_dir"):
            data[key] = Path(data[key]) if data.get(key) else None
        return TrialResult(**data)
    errors = _rank_errors(workdir)
    for error in errors:  # the parameters' own failure says most; a crash is often the echo of another's
        if error["type"] == "failed":
            raise _failure(f"rank {error['rank']}: {error['reason']}", error["retryable"], error["kind"])
    for error in errors:
        if error["type"] == "interrupted":
            raise TrialInterrupted(error["reason"])
    if errors:
        error = errors[0]
        raise _failure(f"rank {error['rank']} crashed: {error['reason']}", True, "crash")
    raise _failure(f"the {nproc} training processes ended with exit status {returncode} and no result: a rank "
                   "died (killed, or out of host memory); torchrun's summary is in the worker's log", True, "crash")


def _rank_errors(workdir: Path) -> list[dict[str, Any]]:
    errors = []
    for path in sorted(workdir.glob("error-*.json")):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a rank killed while writing it
    return sorted(errors, key=lambda e: int(e.get("rank", 0)))


def _failure(reason: str, retryable: bool, kind: str) -> TrialFailed:
    failure = TrialFailed(reason, retryable=retryable)
    failure.kind = kind
    return failure


# -- the rank's side: python -m tunefleet.workers.distributed TRIAL_DIR (under torchrun) ------------------


class _Worker:
    """Rank 0's line to the worker process: one JSON request, one JSON answer."""

    def __init__(self, port: int, secret: str):
        self._conn = socket.create_connection(("127.0.0.1", port))
        self._reader = self._conn.makefile("r", encoding="utf-8")
        self._send({"secret": secret})

    def _send(self, message: Mapping[str, Any]) -> None:
        self._conn.sendall((json.dumps(message) + "\n").encode())

    def ask(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """The worker's answer; raises ConnectionError when the worker is gone (the trial is over)."""
        self._send(message)
        line = self._reader.readline()
        if not line:
            raise ConnectionError("the worker process closed its socket")
        answer: dict[str, Any] = json.loads(line)
        return answer


def main(argv: Sequence[str]) -> int:
    """Run one rank of the trial in folder `argv[0]`; 0 on success, 1 after writing why it failed."""
    import torch
    import torch.distributed as dist

    workdir = Path(argv[0])
    job = json.loads((workdir / JOB_FILE).read_text())
    local_rank = int(os.environ["LOCAL_RANK"])  # torchrun's interface, like RANK and WORLD_SIZE
    device = "cpu" if job["device"] == "cpu" else f"cuda:{local_rank}"
    if device != "cpu":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    rank = dist.get_rank()
    logging.basicConfig(level=job["log_level"] if rank == 0 else logging.WARNING,
                        format=f"rank {rank}: %(name)s: %(message)s")
    try:
        worker = _Worker(job["port"], job["secret"]) if rank == 0 else None
        outcome = _train(job, workdir, device, worker)
        if rank == 0:
            _write(workdir / OUTCOME_FILE, outcome)
        return 0
    except TrialFailed as exc:
        _write_error(workdir, rank, "failed", exc.reason, exc.retryable, exc.kind)
    except TrialInterrupted as exc:
        _write_error(workdir, rank, "interrupted", str(exc), True, "trial")
    except Exception as exc:
        logging.getLogger(__name__).exception("rank %s crashed", rank)
        _write_error(workdir, rank, "crash", summarise(exc), True, "crash")
    finally:
        dist.destroy_process_group()
    return 1


def _train(job: Mapping[str, Any], workdir: Path, device: str, worker: _Worker | None) -> dict[str, Any]:
    """Run `run_trial` on this rank with the collective stop and report; rank 0's outcome as JSON."""
    import torch
    import torch.distributed as dist

    from tunefleet.workers.training import run_trial

    def agreed(value: int, combine: Callable[[Any], None]) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        combine(tensor)
        return int(tensor.item())

    def should_stop() -> bool:
        asked = int(worker.ask({"op": "stop"})["stop"]) if worker is not None else 0
        return bool(agreed(asked, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)))

    def report(step: int, value: float, metrics: dict[str, float]) -> str:
        action = "continue"
        if worker is not None:
            action = str(worker.ask({"op": "report", "step": step, "value": value, "metrics": metrics})["action"])
        return ACTIONS[agreed(ACTIONS.index(action), lambda t: dist.broadcast(t, src=0))]

    resume = job.get("resume_from")
    outcome = run_trial(job["spec"], job["params"], job["rungs"], report, device=device, workdir=workdir,
                        should_stop=should_stop, resume_from=Path(resume) if resume else None)
    return {"pruned": outcome.pruned, "value": outcome.value, "values": outcome.values,
            "validation_metrics": outcome.validation_metrics, "test_metrics": outcome.test_metrics,
            "extra": outcome.extra, "paused_at": outcome.paused_at,
            "artifact_dir": str(outcome.artifact_dir) if outcome.artifact_dir else None,
            "checkpoint_dir": str(outcome.checkpoint_dir) if outcome.checkpoint_dir else None}


def _write_error(workdir: Path, rank: int, kind_of_end: str, reason: str, retryable: bool, kind: str) -> None:
    _write(workdir / f"error-{rank}.json", {"rank": rank, "type": kind_of_end, "reason": reason,
                                            "retryable": retryable, "kind": kind})


def _write(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically: the worker never reads half a file of a rank killed while writing."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, default=str))
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
