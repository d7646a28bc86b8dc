"""`tunefleet study ...` and `tunefleet trial ...`: create, list, watch, pause, stop and inspect."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunefleet.cli.app import CliError, client_for, command, study_app, trial_app
from tunefleet.cli.render import (
    best_value,
    console,
    fmt,
    kv_table,
    print_json,
    progress_text,
    render_generic,
    show_trial,
    state_markup,
    trial_state,
    trial_value,
)
from tunefleet.progress import study_progress
from tunefleet.service.client import Client

FINAL_STUDY_STATES = ("completed", "stopped")

StudyId = Annotated[int, typer.Argument(help="Study id.", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]

@command(study_app, "create")
def study_create(
    ctx: typer.Context,
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec, YAML or JSON.")],
    wait: Annotated[bool, typer.Option(
        help="Show progress until the study is completed or stopped; exit 1 when it ends without a completed "
             "trial or pauses itself (its trials kept failing for one reason: model, data or config).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the new study's id.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between progress polls.")] = 2.0,
    enqueue: Annotated[Path | None, typer.Option(
        help="YAML or JSON list of configurations (parameter: value mappings) to run first, after the baseline.",
        show_default=False)] = None,
) -> None:
    """Submit a study spec; prints the new study's id."""
    from tunefleet.service.spec import parse_spec_text

    if not spec_file.is_file():
        raise CliError(f"no spec file at {spec_file}")
    data = parse_spec_text(spec_file.read_text())
    configurations = _configurations(enqueue, data) if enqueue else []
    client = client_for(ctx)
    study = client.create_study(data)
    for params in configurations:
        client.enqueue_trial(study["id"], params, note=f"from {enqueue.name}" if enqueue else "")
    if quiet:
        console.print(study["id"])
    else:
        console.print(f"[green]created study[/] [bold]{escape(study['name'])}[/] with id [bold]{study['id']}[/]")
    if wait:
        _wait_for_study(ctx, study["id"], interval)


def _configurations(path: Path, spec: Any) -> list[dict[str, Any]]:
    """The list of parameter mappings in a YAML or JSON file, checked against the spec's search space before
    the study is created (nothing half-made); CliError when it is not one, or a value does not fit."""
    import yaml

    from tunefleet.service.spec import SpecError, validate_spec

    if not path.is_file():
        raise CliError(f"no file at {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not YAML or JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise CliError(f"{path} must hold a list of configurations, e.g. [{{learning_rate: 0.0003, lora_r: 16}}]")
    try:
        checked = validate_spec(spec)
    except SpecError:
        return data  # the server names the spec's own problems
    for i, params in enumerate(data):
        problems = checked.param_problems(params, (path.name, i))
        if problems:
            loc, msg = problems[0]
            raise CliError(f"{'.'.join(map(str, loc))}: {msg}")
    return data


def _wait_for_study(ctx: typer.Context, study_id: int, interval: float) -> None:
    client = client_for(ctx)
    study = client.get_study(study_id)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(progress_text(study), total=study.get("max_trials"))
        while True:
            # Running trials move the bar by their last rung and name their progress, so a long trial
            # does not look like a stuck study.
            running = client.list_trials(study_id, state="RUNNING", limit=1000)["items"]
            completed, detail = study_progress(study, running, study.get("max_trials") or 1)
            progress.update(task, completed=completed, total=study.get("max_trials"),
                            description=f"{study.get('name')} [{study.get('state')}] {detail}")
            if study.get("state") in FINAL_STUDY_STATES or study.get("state_reason"):
                break
            time.sleep(interval)
            study = client.get_study(study_id)
    _show_study(client, study)
    if study.get("state_reason"):
        raise CliError(study["state_reason"])
    if not (study.get("counts") or {}).get("complete"):
        raise CliError(f"study {study_id} ended {study.get('state')} without a completed trial: "
                       f"`tunefleet trial ls {study_id} --state fail` shows why")


@command(study_app, "ls")
def study_ls(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="running, paused, stopped or completed.")] = None,
    name: Annotated[str | None, typer.Option(help="Only studies with this name.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    offset: Annotated[int, typer.Option(help="Rows to skip.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """List studies."""
    page = client_for(ctx).list_studies(state=state, name=name, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    table = Table(title=f"studies {offset + 1}-{offset + len(page['items'])} of {page['total']}",
                  title_justify="left")
    counted = ("complete", "pruned", "fail", "running", "paused")
    for column in ("id", "name", "state", "trials", *counted, "best", "created"):
        # In a narrow terminal the name folds and the state keeps its width, rather than both being elided.
        table.add_column(column, justify="right" if column in ("id", *counted) else "left",
                         overflow="fold" if column == "name" else "ellipsis", no_wrap=column == "state")
    for study in page["items"]:
        counts = study.get("counts") or {}
        table.add_row(str(study["id"]), study["name"], study["state"],
                      f"{study.get('trials_used', 0)}/{study.get('max_trials', '?')}",
                      *(str(counts.get(k, 0)) for k in counted),
                      fmt(best_value(study)), str(study.get("created_at", ""))[:19])
    console.print(table)


@command(study_app, "show")
def study_show(ctx: typer.Context, study_id: StudyId, as_json: JsonOption = False) -> None:
    """A study's state, trial counts, best trial (params, metrics) and baseline."""
    client = client_for(ctx)
    study = client.get_study(study_id)
    if as_json:
        print_json(study)
        return
    _show_study(client, study)


def _show_study(client: Client, study: Mapping[str, Any]) -> None:
    spec = study.get("spec") or {}
    console.print(kv_table({
        "study": f"{study['name']} (id {study['id']})",
        "state": study.get("state"),
        **({"paused because": study["state_reason"]} if study.get("state_reason") else {}),
        "model": spec.get("model"),
        "task": spec.get("task"),
        "objective": spec.get("objective"),
        "progress": f"{study.get('trials_used', 0)}/{study.get('max_trials', '?')} trials",
        "gpu hours": study.get("gpu_hours"),
        "trials": study.get("counts"),
        "created": study.get("created_at"),
    }))
    best = study.get("best_trial")
    front = study.get("best_trials") or []
    baseline = None
    if study.get("baseline_trial_id") is not None:
        baseline = client.get_trial(study["baseline_trial_id"])
    if best:
        show_trial(best, title="best trial")
    elif front:
        console.print(pareto_table(spec, front))
    else:
        console.print("[dim]no completed trial yet[/]" if not spec.get("constraints") else
                      "[dim]no completed trial that meets the constraints yet[/]")
    if baseline:
        console.print(kv_table({"trial": f"#{baseline.get('number')} (id {baseline['id']})",
                                 "state": baseline.get("state"), "value": baseline.get("value"),
                                 "params": baseline.get("params")}, title="baseline"))


def pareto_table(spec: Mapping[str, Any], front: list[Mapping[str, Any]]) -> Table:
    """The Pareto front as a table: one row per trial, a column per objective (↑ maximized, ↓ minimized)."""
    objectives = spec.get("objective")
    objectives = objectives if isinstance(objectives, list) else [objectives or {}]
    table = Table(title=f"Pareto front: {len(front)} trial(s) no other beats on every objective "
                  "(`tunefleet study export ID --trial N --out DIR` exports one)", title_justify="left")
    table.add_column("trial")
    table.add_column("id")
    for o in objectives:
        table.add_column(f"{o.get('metric')} {'↓' if o.get('direction') == 'minimize' else '↑'}", justify="right")
    table.add_column("params", overflow="fold")
    for trial in front:
        baseline = " (baseline)" if trial.get("is_baseline") else ""
        table.add_row(f"#{trial.get('number')}{baseline}", str(trial["id"]),
                      *(fmt(v) for v in trial.get("values") or []), fmt(trial.get("params")))
    return table


@command(study_app, "pause")
def study_pause(ctx: typer.Context, study_id: StudyId) -> None:
    """Pause a study: no new trials are leased; running trials go on and finish."""
    _print_state(client_for(ctx).pause_study(study_id))


@command(study_app, "resume")
def study_resume(ctx: typer.Context, study_id: StudyId) -> None:
    """Resume a paused study."""
    _print_state(client_for(ctx).resume_study(study_id))


@command(study_app, "stop")
def study_stop(ctx: typer.Context, study_id: StudyId) -> None:
    """Stop a study for good: running trials are told to stop at their next heartbeat and are not re-queued;
    finished results stay."""
    _print_state(client_for(ctx).stop_study(study_id))


def _print_state(study: Mapping[str, Any]) -> None:
    console.print(f"study [bold]{escape(study['name'])}[/] (id {study['id']}) is now [bold]{study['state']}[/]")


@command(study_app, "delete")
def study_delete(
    ctx: typer.Context,
    study_id: StudyId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a study with its trials, leases and artifacts."""
    client = client_for(ctx)
    study = client.get_study(study_id)
    if not yes and not typer.confirm(
        f"Delete study {study['name']} (id {study_id}) with its {study.get('trials_used', 0)} trials "
        "and their artifacts?"
    ):
        raise typer.Abort()
    client.delete_study(study_id)
    console.print(f"[green]deleted[/] study {escape(study['name'])} (id {study_id})")


@command(study_app, "report")
def study_report(ctx: typer.Context, study_id: StudyId, as_json: JsonOption = False) -> None:
    """Fidelity report: rank correlation of each rung with the final scores, top-k overlap,
    steps saved by pruning, tuned vs baseline with confidence interval."""
    report = client_for(ctx).study_report(study_id)
    if as_json:
        print_json(report)
    else:
        render_generic(report, title=f"study {study_id} report")



# -- trials -------------------------------------------------------------------------------------


@command(trial_app, "ls")
def trial_ls(
    ctx: typer.Context,
    study_id: StudyId,
    state: Annotated[str | None, typer.Option(
        help="WAITING, RUNNING (held by a worker), PAUSED (waiting at a rung), COMPLETE, PRUNED or FAIL.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 100,
    offset: Annotated[int, typer.Option(help="Rows to skip.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """List a study's trials."""
    page = client_for(ctx).list_trials(study_id, state=state.upper() if state else None, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    table = Table(title=f"trials of study {study_id}: {offset + 1}-{offset + len(page['items'])} of "
                  f"{page['total']}", title_justify="left")
    for column in ("id", "#", "state", "value", "last rung", "params", "attempt", "worker"):
        table.add_column(column, overflow="fold")
    for trial in page["items"]:
        rungs = trial.get("intermediate_values") or {}
        last = max(rungs, key=int, default=None)
        value = trial_value(trial)
        table.add_row(str(trial["id"]), str(trial.get("number")), state_markup(trial_state(trial)),
                      fmt(value), f"{last}%: {fmt(rungs[last])}" if last else "—", fmt(trial.get("params")),
                      str(trial.get("attempt", 0)), fmt(trial.get("worker_id")))
    console.print(table)


@command(trial_app, "show")
def trial_show(ctx: typer.Context, trial_id: Annotated[int, typer.Argument(help="Trial id.")],
               as_json: JsonOption = False) -> None:
    """A trial's params, intermediate values, metrics and fail reason."""
    trial = client_for(ctx).get_trial(trial_id)
    if as_json:
        print_json(trial)
    else:
        show_trial(trial, title=f"trial {trial_id}")


