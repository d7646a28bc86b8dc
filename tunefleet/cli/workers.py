"""`tunefleet worker` (one process, or one per GPU), `tunefleet agent` (the user's own script) and `tunefleet demo`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from tunefleet.cli.app import CliError, ServerOption, command, connection, read_token_file, warn
from tunefleet.cli.app import app as root_app

TOKEN_IN_ARGV_WARNING = (
    "--token on the command line is visible to every user of this machine in the process list (ps); "
    "set TUNEFLEET_TOKEN or use --token-file instead")
# The options a worker and an agent share.
WorkerToken = Annotated[str | None, typer.Option(
    "--token", envvar="TUNEFLEET_TOKEN", show_default=False,
    help="Bearer token (needed when the server has auth on). On the command line it shows in the process "
         "list (ps), with a warning: prefer TUNEFLEET_TOKEN or --token-file.")]
WorkerTokenFile = Annotated[Path | None, typer.Option(
    "--token-file", envvar="TUNEFLEET_TOKEN_FILE", show_default=False,
    help="Read the bearer token from this file (surrounding whitespace stripped), so it stays out of the "
         "process list. Wins over TUNEFLEET_TOKEN; with --token too it is an error.")]
MaxTrials = Annotated[int | None, typer.Option(help="Stop after this many trials.")]
Once = Annotated[bool, typer.Option("--once", help=(
    "Exit as soon as there is no work; exit with status 1 when the server cannot be reached "
    "(after the client's retries) instead of waiting for it."))]
WorkDir = Annotated[Path, typer.Option(help="Folder for trial outputs.")]
IdleSleep = Annotated[float, typer.Option(help="Seconds between lease requests when idle.")]
LogLevel = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")]


@command(root_app)
def worker(
    ctx: typer.Context,
    server: ServerOption = None,
    token: WorkerToken = None,
    token_file: WorkerTokenFile = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda:N (default: cuda:0 when a GPU is visible)")] = None,
    gpus: Annotated[str | None, typer.Option(help="'all' or '0,2': one worker process per GPU (per --nproc GPUs).")
                    ] = None,
    nproc: Annotated[int, typer.Option(min=1, help=(
        "Devices one worker owns: it also leases trials of studies with resources.gpus_per_trial up to N, and "
        "trains those as DDP processes under torchrun. --device cuda:K: GPUs K..K+N-1; --device cpu: N CPU "
        "processes (gloo); --gpus: one worker per N consecutive GPUs of the list."))] = 1,
    max_trials: MaxTrials = None,
    once: Once = False,
    simulated: Annotated[bool, typer.Option("--simulated", help="Torch-free simulated training.")] = False,
    worker_id: Annotated[str | None, typer.Option(help="(default: <hostname>-<device>)")] = None,
    workdir: WorkDir = Path(".tunefleet/work"),
    cache_dir: Annotated[Path | None, typer.Option(
        help="Folder for uploaded data sets and models fetched from the server, by hash, shared by the node's "
             "workers (default: 'cache' beside --workdir).")] = None,
    idle_sleep: IdleSleep = 2.0,
    log_level: LogLevel = "INFO",
) -> None:
    """Pull trials from the server and train them until stopped (SIGTERM re-queues the running trial)."""
    from tunefleet.fleet import run_worker, run_worker_fleet
    from tunefleet.workers.loop import visible_gpus

    url, token = _worker_connection(ctx, server, token, token_file)
    if gpus is not None:
        indices = visible_gpus() if gpus == "all" else [int(g) for g in gpus.split(",") if g.strip()]
        if not indices:
            raise CliError("--gpus: no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        groups = _gpu_groups(indices, nproc)
        options = {"nproc": nproc, "max_trials": max_trials, "once": once, "simulated": simulated,
                   "workdir": workdir, "cache_dir": cache_dir, "idle_sleep": idle_sleep, "log_level": log_level}
        raise typer.Exit(run_worker_fleet(url, token, groups, options))
    device = device or ("cuda:0" if visible_gpus() else "cpu")
    last = int(device.partition(":")[2] or 0) + nproc - 1
    if device.startswith("cuda") and nproc > 1 and last >= len(visible_gpus()):
        raise CliError(f"--device {device} --nproc {nproc} needs GPUs up to cuda:{last}; {len(visible_gpus())} are "
                       "visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    run_worker(url, token, device=device, nproc=nproc, worker_id=worker_id, max_trials=max_trials, once=once,
               simulated=simulated, workdir=workdir, cache_dir=cache_dir, idle_sleep=idle_sleep, log_level=log_level)


def _gpu_groups(indices: list[int], nproc: int) -> list[list[int]]:
    """The GPUs of each worker of `--gpus LIST --nproc N`: consecutive runs of N (a worker's GPUs are
    cuda:K..K+N-1); raises CliError when the list does not split so."""
    groups = [indices[i:i + nproc] for i in range(0, len(indices), nproc)]
    for group in groups:
        if group != list(range(group[0], group[0] + nproc)):
            raise CliError(f"--gpus {','.join(map(str, indices))} --nproc {nproc}: each worker needs {nproc} "
                           f"consecutive GPUs, and {','.join(map(str, group))} are not; list them in runs of "
                           f"{nproc}, such as 0,1,2,3")
    return groups


@command(root_app, context_settings={"allow_interspersed_args": False})
def agent(
    ctx: typer.Context,
    command_line: Annotated[list[str], typer.Argument(
        metavar="COMMAND", show_default=False,
        help="The training command, run once per trial of a `task: script` study, after `--`. `{name}` in it "
             "becomes the parameter's value; the parameters are also in the JSON file TUNEFLEET_PARAMS_FILE and "
             "in TUNEFLEET_PARAM_<NAME> variables.")],
    server: ServerOption = None,
    token: WorkerToken = None,
    token_file: WorkerTokenFile = None,
    grace: Annotated[float, typer.Option(
        help="Seconds between SIGTERM and SIGKILL when a trial is pruned or stopped; after a pause answer, "
             "also the time the script has to write its checkpoint and exit by itself.")] = 10.0,
    max_trials: MaxTrials = None,
    once: Once = False,
    worker_id: Annotated[str | None, typer.Option(help="(default: <hostname>-agent-<pid>)")] = None,
    workdir: WorkDir = Path(".tunefleet/agent"),
    idle_sleep: IdleSleep = 2.0,
    log_level: LogLevel = "INFO",
) -> None:
    """Run your own training command for each trial of `task: script` studies (see docs/byo.md): lease, run,
    relay its reports, stop it on prune or pause, upload its output, complete or fail."""
    from tunefleet.fleet import run_agent

    if grace < 0:
        raise CliError(f"--grace {grace}: give a number of seconds >= 0")
    program = command_line[0]
    if "{" not in program and shutil.which(program) is None:
        raise CliError(f"{program}: no such command (not on PATH, or not executable)")
    url, token = _worker_connection(ctx, server, token, token_file)
    run_agent(url, token, command_line, grace_seconds=grace, worker_id=worker_id, max_trials=max_trials, once=once,
              workdir=workdir, idle_sleep=idle_sleep, log_level=log_level)


def _worker_connection(ctx: typer.Context, server: str | None, token: str | None, token_file: Path | None
                       ) -> tuple[str, str | None]:
    """The server URL and token of a worker or an agent: `--token-file` wins, a token typed on the command
    line gets a warning (ps shows it)."""
    from_argv = _token_from_argv(ctx)
    if token_file is not None:
        if from_argv:
            raise CliError("give the token once: --token or --token-file, not both")
        token = read_token_file(token_file)
    elif from_argv:
        warn(TOKEN_IN_ARGV_WARNING)
    return connection(ctx, server, token)


def _token_from_argv(ctx: typer.Context) -> bool:
    """Whether `--token` was typed on the command line (the worker's own option or the global one), where
    `ps` shows it, rather than taken from TUNEFLEET_TOKEN."""
    sources = (context.get_parameter_source("token") for context in (ctx, ctx.find_root()))
    return any(source is not None and source.name == "COMMANDLINE" for source in sources)


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
