"""`tunefleet`: the command line, a thin shell over `service.client.Client` (and, for `server`,
`db upgrade` and `token create`, over the server's own modules, imported lazily).

Every error a user can cause or meet (an API error, an unreachable server, a bad spec file, a
database that is not ready) prints one red line and exits with status 1; never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.client import ApiError, Client

__all__ = ["app"]

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(name="tunefleet", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hyperparameter optimisation service for fine-tuning language models.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
study_app = typer.Typer(no_args_is_help=True, help="Create, watch and manage studies.")
trial_app = typer.Typer(no_args_is_help=True, help="Inspect trials.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
app.add_typer(db_app, name="db")
app.add_typer(study_app, name="study")
app.add_typer(trial_app, name="trial")
app.add_typer(token_app, name="token")

F = TypeVar("F", bound=Callable[..., Any])
FINAL_STUDY_STATES = ("completed", "stopped")
# Modules only the `worker` extra installs: a missing one gets an install hint.
WORKER_EXTRAS = frozenset({"torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "sklearn"})


class Role(str, Enum):
    admin = "admin"
    user = "user"
    worker = "worker"


class CliError(Exception):
    """A user-facing problem detected by the CLI itself (a missing file, nothing to export...)."""


# -- errors: one red line, exit 1 ---------------------------------------------------------------


def _expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ApiError, CliError, OSError, ValueError]
    try:  # the server's domain errors (database not ready, bad role...), when the server is installed
        from service.errors import TunefleetError

        errors.append(TunefleetError)
    except ImportError:
        pass
    return tuple(errors)


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


def friendly_errors(func: F) -> F:
    """Turn expected exceptions into one red line and exit status 1; Ctrl-C exits 130 quietly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except ModuleNotFoundError as exc:
            hint = " (pip install 'tunefleet[worker]')" if (exc.name or "").split(".")[0] in WORKER_EXTRAS else ""
            _fail(f"{exc}{hint}")
        except _expected_errors() as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            _fail(message or type(exc).__name__)

    return wrapper  # type: ignore[return-value]


def command(group: typer.Typer, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """`group.command(name)` with `friendly_errors` applied: every command handles errors one way."""

    def register(func: F) -> F:
        group.command(name, **kwargs)(friendly_errors(func))
        return func

    return register


# -- global options -----------------------------------------------------------------------------


@dataclass
class _Connection:
    server: str | None
    token: str | None


ServerOption = Annotated[str | None, typer.Option(
    "--server", envvar="TUNEFLEET_SERVER", help="Server URL (default: settings' server_url, http://127.0.0.1:8000)",
    show_default=False)]
TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="TUNEFLEET_TOKEN", help="Bearer token (needed when the server has auth on).",
    show_default=False)]


@app.callback()
def main(ctx: typer.Context, server: ServerOption = None, token: TokenOption = None) -> None:
    """tunefleet: Optuna studies on a server, trials on any number of GPU workers."""
    ctx.obj = _Connection(server, token)


def _settings() -> Any:
    from service.config import Settings

    return Settings()


def _connection(ctx: typer.Context, server: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    root = ctx.find_root().obj or _Connection(None, None)
    server = server or root.server
    token = token or root.token
    if server is None or token is None:
        try:  # TUNEFLEET_SERVER_URL / TUNEFLEET_TOKEN / .env, through the one settings class
            settings = _settings()
            server, token = server or settings.server_url, token or settings.token
        except ImportError:
            pass
    return server or "http://127.0.0.1:8000", token


def _client(ctx: typer.Context) -> Client:
    server, token = _connection(ctx)
    # Interactive: fail within seconds rather than the workers' patient default.
    return Client(server, token, retries=2)


# -- formatting ---------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits, None as a dash, containers as compact JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


def _kv_table(rows: Mapping[str, Any] | Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows.items() if isinstance(rows, Mapping) else rows:
        table.add_row(str(key), fmt(value))
    return table


def _records_table(records: list[Mapping[str, Any]], title: str | None = None) -> Table:
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(*(fmt(record.get(c)) for c in columns))
    return table


def render_generic(data: Any, title: str | None = None, path: str = "") -> None:
    """Print any JSON document as tables: scalars as key/value rows, lists of objects as tables,
    objects of objects as one table keyed by the outer key, anything else as JSON. Nested tables
    are titled with their key path (`best_trial.params`)."""
    if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
        console.print(_records_table(data, title) if data else f"{title or ''}: (none)")
        return
    if not isinstance(data, Mapping):
        console.print(_kv_table([(title or "value", data)]))
        return
    scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list)) or not v}
    if scalars:
        console.print(_kv_table(scalars, title))
    for key, value in data.items():
        if key in scalars:
            continue
        name = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values()):
            rows = [{key: k, **v} for k, v in value.items()]
            console.print(_records_table(rows, title=name))
        elif isinstance(value, list) and not all(isinstance(v, Mapping) for v in value):
            console.print(_kv_table([(name, value)]))
        else:
            render_generic(value, title=name, path=name)


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def _progress_text(study: Mapping[str, Any]) -> str:
    counts = study.get("counts") or {}
    parts = [f"{k} {v}" for k, v in counts.items() if v]
    return f"{study.get('name')} [{study.get('state')}] " + ", ".join(parts)


def _best_value(study: Mapping[str, Any]) -> Any:
    best = study.get("best_trial") or {}
    return best.get("value") if best.get("values") is None or len(best["values"]) == 1 else best["values"]


# -- server and database ------------------------------------------------------------------------


@command(app)
def server(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: settings' host, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: settings' port, 8000)")] = None,
    migrate: Annotated[bool | None, typer.Option(
        help="Upgrade the database schema before serving. Default: only for the embedded SQLite default; "
             "a configured database is upgraded with `tunefleet db upgrade`.")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Server processes (PostgreSQL only; default: settings' server_processes, 1). About one "
                    "per CPU core when many workers call the server.")] = None,
) -> None:
    """Run the API server (uvicorn) on the configured database."""
    from service.api.app import run_server

    if migrate is None:
        migrate = _settings().database_url is None
    code = run_server(host, port, migrate, processes)  # None: the settings' values
    if code:
        raise typer.Exit(code)


@command(db_app, "upgrade")
def db_upgrade() -> None:
    """Create or upgrade the tunefleet and Optuna tables (TUNEFLEET_DATABASE_URL)."""
    from service.db import upgrade_database

    settings = _settings()
    revision = upgrade_database(settings)
    console.print(f"[green]database ready[/] at schema revision [bold]{revision}[/]")


@command(app)
def dashboard(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
) -> None:
    """Run optuna-dashboard on the server's database."""
    import optuna_dashboard

    url = dashboard_storage_url(_settings().resolved_database_url)
    console.print(f"optuna-dashboard on [bold]http://{host}:{port}[/]")
    optuna_dashboard.run_server(url, host=host, port=port)


def dashboard_storage_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3, which is not installed: name psycopg2."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg2://" + url.removeprefix(bare)
    return url


# -- studies ------------------------------------------------------------------------------------

StudyId = Annotated[int, typer.Argument(help="Study id.", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]


@command(study_app, "create")
def study_create(
    ctx: typer.Context,
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec, YAML or JSON.")],
    wait: Annotated[bool, typer.Option(help="Show progress until the study is completed.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the new study's id.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between progress polls.")] = 2.0,
) -> None:
    """Submit a study spec; prints the new study's id."""
    from service.spec import parse_spec_text

    if not spec_file.is_file():
        raise CliError(f"no spec file at {spec_file}")
    study = _client(ctx).create_study(parse_spec_text(spec_file.read_text()))
    if quiet:
        console.print(study["id"])
    else:
        console.print(f"[green]created study[/] [bold]{escape(study['name'])}[/] with id [bold]{study['id']}[/]")
    if wait:
        _wait_for_study(ctx, study["id"], interval)


def _wait_for_study(ctx: typer.Context, study_id: int, interval: float) -> None:
    client = _client(ctx)
    study = client.get_study(study_id)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(_progress_text(study), total=study.get("max_trials"))
        while True:
            progress.update(task, completed=study.get("trials_used", 0), total=study.get("max_trials"),
                            description=_progress_text(study))
            if study.get("state") in FINAL_STUDY_STATES:
                break
            time.sleep(interval)
            study = client.get_study(study_id)
    _show_study(client, study)


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
    page = _client(ctx).list_studies(state=state, name=name, limit=limit, offset=offset)
    if as_json:
        _print_json(page)
        return
    table = Table(title=f"studies {offset + 1}-{offset + len(page['items'])} of {page['total']}",
                  title_justify="left")
    for column in ("id", "name", "state", "trials", "complete", "pruned", "fail", "running", "best", "created"):
        table.add_column(column, justify="right" if column in ("id", "complete", "pruned", "fail", "running")
                         else "left")
    for study in page["items"]:
        counts = study.get("counts") or {}
        table.add_row(str(study["id"]), study["name"], study["state"],
                      f"{study.get('trials_used', 0)}/{study.get('max_trials', '?')}",
                      *(str(counts.get(k, 0)) for k in ("complete", "pruned", "fail", "running")),
                      fmt(_best_value(study)), str(study.get("created_at", ""))[:19])
    console.print(table)


@command(study_app, "show")
def study_show(ctx: typer.Context, study_id: StudyId, as_json: JsonOption = False) -> None:
    """A study's state, trial counts, best trial (params, metrics) and baseline."""
    client = _client(ctx)
    study = client.get_study(study_id)
    if as_json:
        _print_json(study)
        return
    _show_study(client, study)


def _show_study(client: Client, study: Mapping[str, Any]) -> None:
    spec = study.get("spec") or {}
    console.print(_kv_table({
        "study": f"{study['name']} (id {study['id']})",
        "state": study.get("state"),
        "model": spec.get("model"),
        "task": spec.get("task"),
        "objective": spec.get("objective"),
        "progress": f"{study.get('trials_used', 0)}/{study.get('max_trials', '?')} trials",
        "gpu hours": study.get("gpu_hours"),
        "trials": study.get("counts"),
        "created": study.get("created_at"),
    }))
    best = study.get("best_trial")
    baseline = None
    if study.get("baseline_trial_id") is not None:
        baseline = client.get_trial(study["baseline_trial_id"])
    if best:
        _show_trial(best, title="best trial")
    else:
        console.print("[dim]no completed trial yet[/]")
    if baseline:
        console.print(_kv_table({"trial": f"#{baseline.get('number')} (id {baseline['id']})",
                                 "state": baseline.get("state"), "value": baseline.get("value"),
                                 "params": baseline.get("params")}, title="baseline"))


@command(study_app, "pause")
def study_pause(ctx: typer.Context, study_id: StudyId) -> None:
    """Pause a study: running trials are told to stop and re-queued; no new leases."""
    _print_state(_client(ctx).pause_study(study_id))


@command(study_app, "resume")
def study_resume(ctx: typer.Context, study_id: StudyId) -> None:
    """Resume a paused study."""
    _print_state(_client(ctx).resume_study(study_id))


@command(study_app, "stop")
def study_stop(ctx: typer.Context, study_id: StudyId) -> None:
    """Stop a study for good: running trials are told to stop; finished results stay."""
    _print_state(_client(ctx).stop_study(study_id))


def _print_state(study: Mapping[str, Any]) -> None:
    console.print(f"study [bold]{escape(study['name'])}[/] (id {study['id']}) is now [bold]{study['state']}[/]")


@command(study_app, "delete")
def study_delete(
    ctx: typer.Context,
    study_id: StudyId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a study with its trials, leases and artifacts."""
    client = _client(ctx)
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
    report = _client(ctx).study_report(study_id)
    if as_json:
        _print_json(report)
    else:
        render_generic(report, title=f"study {study_id} report")


@command(study_app, "export")
def study_export(
    ctx: typer.Context,
    study_id: StudyId,
    dest: Annotated[Path, typer.Option("--best", metavar="DIR", help="Folder for the best trial's files.")],
) -> None:
    """Download the best trial's artifacts (adapter, logs) into DIR with a model card README.md."""
    client = _client(ctx)
    study = client.get_study(study_id)
    best = study.get("best_trial")
    if not best:
        raise CliError(f"study {study_id} has no completed trial yet: nothing to export")
    baseline = client.get_trial(study["baseline_trial_id"]) if study.get("baseline_trial_id") else None
    names = download_artifacts(client, best["id"], dest)
    (dest / "README.md").write_text(model_card(study, best, baseline, names))
    console.print(f"[green]exported[/] trial #{best.get('number')} (id {best['id']}): {len(names)} file(s) "
                  f"and README.md into [bold]{escape(str(dest))}[/]")


def download_artifacts(client: Client, trial_id: int, dest: Path) -> list[str]:
    """Write every artifact of a trial under `dest`, keeping relative names; returns the names.

    Raises CliError when a name would escape `dest` (a defence against a hostile server).
    """
    root = dest.resolve()
    names = []
    for artifact in client.list_artifacts(trial_id):
        target = (root / artifact["name"]).resolve()
        if not target.is_relative_to(root):
            raise CliError(f"refusing artifact name {artifact['name']!r}: it points outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.download_artifact(trial_id, artifact["name"]))
        names.append(artifact["name"])
    return names


def model_card(study: Mapping[str, Any], trial: Mapping[str, Any], baseline: Mapping[str, Any] | None,
               files: list[str]) -> str:
    """A Markdown model card (with Hugging Face front matter) for an exported trial."""
    spec = study.get("spec") or {}
    objectives = spec.get("objective")
    has_adapter = any(name.startswith("adapter/") for name in files)
    lines = ["---", f"base_model: {spec.get('model', 'unknown')}",
             *(["library_name: peft"] if has_adapter else []), "tags: [tunefleet, optuna]", "---", "",
             f"# {study['name']}: best trial #{trial.get('number')}", "",
             f"Fine-tuned from `{spec.get('model')}` for {spec.get('task')}, selected by tunefleet study "
             f"{study['name']} (id {study['id']}) out of {study.get('trials_used', '?')} trials.", "",
             f"- objective: `{json.dumps(objectives)}`",
             f"- value: {fmt(trial.get('value') if trial.get('value') is not None else trial.get('values'))}",
             f"- trial id {trial['id']}, attempt {trial.get('attempt', 0)}, finished {trial.get('datetime_complete')}",
             ""]
    runs = {"this model": trial, **({f"baseline (trial #{baseline.get('number')})": baseline} if baseline else {})}
    lines += _md_table("Hyperparameters", {k: {**(spec.get("fixed") or {}), **(t.get("params") or {})}
                                           for k, t in runs.items()})
    lines += _md_table("Validation metrics", {k: t.get("validation_metrics") or {} for k, t in runs.items()})
    lines += _md_table("Test metrics (held-out split, never used for selection)",
                       {k: t.get("test_metrics") or {} for k, t in runs.items()})
    if files:
        lines += ["## Files", "", *(f"- `{name}`" for name in files), ""]
    if has_adapter:
        lines += ["## Use", "", "```python", "from peft import AutoPeftModel",
                  'model = AutoPeftModel.from_pretrained("./adapter")', "```", ""]
    elif "model.safetensors" in files and spec.get("task") in AUTO_CLASSES:
        auto = AUTO_CLASSES[spec["task"]]
        lines += ["## Use", "", "```python", f"from transformers import AutoTokenizer, {auto}",
                  f'model = {auto}.from_pretrained(".")', 'tokenizer = AutoTokenizer.from_pretrained(".")',
                  "```", ""]
    return "\n".join(lines)


# The transformers class that loads a fully fine-tuned model of each task.
AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification", "causal-lm": "AutoModelForCausalLM"}


def _md_table(title: str, columns: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A Markdown table with one row per name and one column per run (this model, the baseline)."""
    names: list[str] = []
    for values in columns.values():
        names.extend(n for n in values if n not in names)
    if not names:
        return []
    header = ["name", *columns]
    rows = [[name, *(fmt(values.get(name)) for values in columns.values())] for name in names]
    return [f"## {title}", "", *("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows]), ""]


# -- trials -------------------------------------------------------------------------------------


@command(trial_app, "ls")
def trial_ls(
    ctx: typer.Context,
    study_id: StudyId,
    state: Annotated[str | None, typer.Option(help="WAITING, RUNNING, COMPLETE, PRUNED or FAIL.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 100,
    offset: Annotated[int, typer.Option(help="Rows to skip.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """List a study's trials."""
    page = _client(ctx).list_trials(study_id, state=state.upper() if state else None, limit=limit, offset=offset)
    if as_json:
        _print_json(page)
        return
    table = Table(title=f"trials of study {study_id}: {offset + 1}-{offset + len(page['items'])} of "
                  f"{page['total']}", title_justify="left")
    for column in ("id", "#", "state", "value", "last rung", "params", "attempt", "worker"):
        table.add_column(column, overflow="fold")
    for trial in page["items"]:
        rungs = trial.get("intermediate_values") or {}
        last = max(rungs, key=int, default=None)
        value = trial.get("value") if trial.get("values") in (None, []) or len(trial["values"]) == 1 \
            else trial["values"]
        table.add_row(str(trial["id"]), str(trial.get("number")), _state_markup(trial.get("state", "")),
                      fmt(value), f"{last}%: {fmt(rungs[last])}" if last else "—", fmt(trial.get("params")),
                      str(trial.get("attempt", 0)), fmt(trial.get("worker_id")))
    console.print(table)


def _state_markup(state: str) -> str:
    colour = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}.get(state, "white")
    return f"[{colour}]{state}[/]"


@command(trial_app, "show")
def trial_show(ctx: typer.Context, trial_id: Annotated[int, typer.Argument(help="Trial id.")],
               as_json: JsonOption = False) -> None:
    """A trial's params, intermediate values, metrics and fail reason."""
    trial = _client(ctx).get_trial(trial_id)
    if as_json:
        _print_json(trial)
    else:
        _show_trial(trial, title=f"trial {trial_id}")


def _show_trial(trial: Mapping[str, Any], title: str) -> None:
    console.print(_kv_table({
        "trial": f"#{trial.get('number')} (id {trial['id']}) of study {trial.get('study_id')}",
        "state": trial.get("state"),
        "value": trial.get("value") if trial.get("values") in (None, []) or len(trial["values"]) == 1
        else trial["values"],
        "attempt": trial.get("attempt"),
        "worker": trial.get("worker_id"),
        "started": trial.get("datetime_start"),
        "finished": trial.get("datetime_complete"),
        **({"fail reason": trial["fail_reason"]} if trial.get("fail_reason") else {}),
    }, title=title))
    for name in ("params", "intermediate_values", "validation_metrics", "test_metrics"):
        if trial.get(name):
            console.print(_kv_table(trial[name], title=name.replace("_", " ")))


# -- tokens -------------------------------------------------------------------------------------


@command(token_app, "create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what uses the token, e.g. ci or node1.")],
    role: Annotated[Role, typer.Option(help="admin, user or worker.")],
) -> None:
    """Create a token directly in the database (so the first admin token can be made); prints it once."""
    from service.auth import create_token

    plain = create_token(_settings(), name, role.value)
    err_console.print(f"[green]created[/] {role.value} token [bold]{escape(name)}[/]; it is shown only now:")
    console.print(plain, soft_wrap=True, highlight=False)


@command(token_app, "ls")
def token_ls(ctx: typer.Context) -> None:
    """List tokens (admin)."""
    console.print(_records_table(_client(ctx).list_tokens(), title="tokens"))


@command(token_app, "revoke")
def token_revoke(ctx: typer.Context, token_id: Annotated[int, typer.Argument(help="Token id.")]) -> None:
    """Revoke a token (admin)."""
    _client(ctx).revoke_token(token_id)
    console.print(f"[green]revoked[/] token {token_id}")


# -- workers ------------------------------------------------------------------------------------


@command(app)
def worker(
    ctx: typer.Context,
    server: ServerOption = None,
    token: TokenOption = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda:N (default: cuda:0 when a GPU is visible)")] = None,
    gpus: Annotated[str | None, typer.Option(help="'all' or '0,2': one worker process per GPU.")] = None,
    max_trials: Annotated[int | None, typer.Option(help="Stop after this many trials.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit as soon as there is no work.")] = False,
    simulated: Annotated[bool, typer.Option("--simulated", help="Torch-free simulated training.")] = False,
    worker_id: Annotated[str | None, typer.Option(help="(default: <hostname>-<device>)")] = None,
    workdir: Annotated[Path, typer.Option(help="Folder for trial outputs.")] = Path(".tunefleet/work"),
    idle_sleep: Annotated[float, typer.Option(help="Seconds between lease requests when idle.")] = 2.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Pull trials from the server and train them until stopped (SIGTERM re-queues the running trial)."""
    from workers.loop import visible_gpus

    url, token = _connection(ctx, server, token)
    if gpus is not None:
        indices = visible_gpus() if gpus == "all" else [int(g) for g in gpus.split(",") if g.strip()]
        if not indices:
            raise CliError("--gpus: no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        options = {"max_trials": max_trials, "once": once, "simulated": simulated, "workdir": workdir,
                   "idle_sleep": idle_sleep, "log_level": log_level}
        raise typer.Exit(_run_worker_fleet(url, token, indices, options))
    device = device or ("cuda:0" if visible_gpus() else "cpu")
    _run_one_worker(url, token, device=device, worker_id=worker_id, max_trials=max_trials, once=once,
                    simulated=simulated, workdir=workdir, idle_sleep=idle_sleep, log_level=log_level)


def _run_one_worker(url: str, token: str | None, *, device: str, worker_id: str | None, max_trials: int | None,
                    once: bool, simulated: bool, workdir: Path, idle_sleep: float, log_level: str) -> None:
    from rich.logging import RichHandler

    from workers.loop import HFTrainer, Trainer, WorkerLoop, default_worker_id

    logging.basicConfig(level=log_level.upper(), format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the trial log
    trainer: Trainer
    if simulated:
        from workers.simulated import SimulatedTrainer

        trainer = SimulatedTrainer()
    else:
        importlib.import_module("workers.training")  # fail now, not at the first lease, without torch
        trainer = HFTrainer(device)
    with Client(url, token) as client:
        loop = WorkerLoop(client, trainer, worker_id=worker_id or default_worker_id(device), device=device,
                          max_trials=max_trials, once=once, idle_sleep=idle_sleep, workdir=workdir)
        loop.install_signal_handlers()
        loop.run()


def _run_worker_fleet(url: str, token: str | None, indices: list[int], options: Mapping[str, Any]) -> int:
    """One `tunefleet worker --device cuda:i` subprocess per GPU; forwards SIGTERM/SIGINT, returns the
    worst exit status."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif value is not None:
            flags += [flag, str(value)]
    # The token travels in the environment, not argv, so `ps` does not show it.
    env = {**os.environ, "TUNEFLEET_SERVER": url, **({"TUNEFLEET_TOKEN": token} if token else {})}
    # Own sessions: a terminal's Ctrl-C reaches only this parent, which forwards it once; two signals
    # would make a child quit at once instead of re-queueing its trial.
    children = [subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--device", f"cuda:{i}", *flags],
                                 env=env, start_new_session=True) for i in indices]
    console.print(f"started {len(children)} workers on GPUs {', '.join(map(str, indices))}")

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(abs(child.wait()) for child in children)


# -- demo ---------------------------------------------------------------------------------------


@command(app)
def demo(
    trials: Annotated[int, typer.Option(help="Trials in the demo study.")] = 16,
    workers: Annotated[int, typer.Option(help="Worker processes (one per GPU; on a CPU one uses every core).")] = 1,
    port: Annotated[int, typer.Option(help="Port of the demo server (0: any free port).")] = 0,
) -> None:
    """A real tuning study end to end on this machine: server, worker, study, progress, result."""
    from workers.demo import run_demo

    run_demo(trials=trials, workers=workers, port=port)


if __name__ == "__main__":
    app()
