"""`tunefleet worker` (one process, or one per GPU) and `tunefleet demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunefleet.cli.app import CliError, ServerOption, TokenOption, command, connection
from tunefleet.cli.app import app as root_app


@command(root_app)
def worker(
    ctx: typer.Context,
    server: ServerOption = None,
    token: TokenOption = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda:N (default: cuda:0 when a GPU is visible)")] = None,
    gpus: Annotated[str | None, typer.Option(help="'all' or '0,2': one worker process per GPU.")] = None,
    max_trials: Annotated[int | None, typer.Option(help="Stop after this many trials.")] = None,
    once: Annotated[bool, typer.Option("--once", help=(
        "Exit as soon as there is no work; exit with status 1 when the server cannot be reached "
        "(after the client's retries) instead of waiting for it."))] = False,
    simulated: Annotated[bool, typer.Option("--simulated", help="Torch-free simulated training.")] = False,
    worker_id: Annotated[str | None, typer.Option(help="(default: <hostname>-<device>)")] = None,
    workdir: Annotated[Path, typer.Option(help="Folder for trial outputs.")] = Path(".tunefleet/work"),
    idle_sleep: Annotated[float, typer.Option(help="Seconds between lease requests when idle.")] = 2.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Pull trials from the server and train them until stopped (SIGTERM re-queues the running trial)."""
    from tunefleet.fleet import run_worker, run_worker_fleet
    from tunefleet.workers.loop import visible_gpus

    url, token = connection(ctx, server, token)
    if gpus is not None:
        indices = visible_gpus() if gpus == "all" else [int(g) for g in gpus.split(",") if g.strip()]
        if not indices:
            raise CliError("--gpus: no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        options = {"max_trials": max_trials, "once": once, "simulated": simulated, "workdir": workdir,
                   "idle_sleep": idle_sleep, "log_level": log_level}
        raise typer.Exit(run_worker_fleet(url, token, indices, options))
    device = device or ("cuda:0" if visible_gpus() else "cpu")
    run_worker(url, token, device=device, worker_id=worker_id, max_trials=max_trials, once=once,
                    simulated=simulated, workdir=workdir, idle_sleep=idle_sleep, log_level=log_level)


@command(root_app)
def demo(
    trials: Annotated[int, typer.Option(help="Trials in the demo study.")] = 16,
    workers: Annotated[int, typer.Option(
        help="Worker processes; each trains on the CPU, and one already uses every core.")] = 1,
    port: Annotated[int, typer.Option(help="Port of the demo server (0: any free port).")] = 0,
) -> None:
    """A real tuning study end to end on this machine: server, worker, study, progress, result."""
    from tunefleet.demo import run_demo

    run_demo(trials=trials, workers=workers, port=port)
