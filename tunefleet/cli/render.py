"""How the CLI prints: consoles, cells, key/value and record tables, any JSON document as tables."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["best_value", "console", "err_console", "fmt", "kv_table", "print_json", "progress_text",
           "records_table", "render_generic", "show_trial", "state_markup", "trial_state", "trial_value"]

# Piped or redirected output (`study ls | grep`, a cron job's log) has no terminal to measure, and rich
# would then cut every table to 80 columns, eliding names. Tables take only the width they need, so a
# wide console costs nothing; COLUMNS, when set, still wins.
PIPE_WIDTH = 400


def _piped_width() -> int | None:
    """PIPE_WIDTH when stdout is not a terminal and COLUMNS is unset; None (let rich measure) otherwise."""
    stdout = sys.stdout
    if os.environ.get("COLUMNS") or (stdout is not None and stdout.isatty()):
        return None
    return PIPE_WIDTH


console = Console(width=_piped_width())
err_console = Console(stderr=True)


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


def kv_table(rows: Mapping[str, Any] | Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows.items() if isinstance(rows, Mapping) else rows:
        table.add_row(str(key), fmt(value))
    return table


def records_table(records: Sequence[Mapping[str, Any]], title: str | None = None) -> Table:
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
        console.print(records_table(data, title) if data else f"{title or ''}: (none)")
        return
    if not isinstance(data, Mapping):
        console.print(kv_table([(title or "value", data)]))
        return
    scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list)) or not v}
    if scalars:
        console.print(kv_table(scalars, title))
    for key, value in data.items():
        if key in scalars:
            continue
        name = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values()):
            rows = [{key: k, **v} for k, v in value.items()]
            console.print(records_table(rows, title=name))
        elif isinstance(value, list) and not all(isinstance(v, Mapping) for v in value):
            console.print(kv_table([(name, value)]))
        else:
            render_generic(value, title=name, path=name)


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def progress_text(study: Mapping[str, Any]) -> str:
    counts = study.get("counts") or {}
    parts = [f"{k} {v}" for k, v in counts.items() if v]
    return f"{study.get('name')} [{study.get('state')}] " + ", ".join(parts)


def best_value(study: Mapping[str, Any]) -> Any:
    """The best trial's value, or how many trials a multi-objective study has on its Pareto front."""
    if study.get("best_trial") is None and study.get("best_trials"):
        return f"{len(study['best_trials'])} on the Pareto front"
    best = study.get("best_trial") or {}
    return best.get("value") if best.get("values") is None or len(best["values"]) == 1 else best["values"]


def trial_value(trial: Mapping[str, Any]) -> Any:
    """A trial's objective value, or its list of values in a multi-objective study."""
    values = trial.get("values")
    return trial.get("value") if values in (None, []) or len(values) == 1 else values


def trial_state(trial: Mapping[str, Any]) -> str:
    """The trial's state as a person reads it: `PAUSED at 20%` for a paused trial (RUNNING in Optuna)."""
    if trial.get("paused_at") is not None:
        return f"PAUSED at {trial['paused_at']}%"
    return str(trial.get("state", ""))


def state_markup(state: str) -> str:
    colour = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}.get(
        state, "magenta" if state.startswith("PAUSED") else "white")
    return f"[{colour}]{state}[/]"


def show_trial(trial: Mapping[str, Any], title: str) -> None:
    """A trial as key/value tables: its summary, then params, rung values and metrics."""
    console.print(kv_table({
        "trial": f"#{trial.get('number')} (id {trial['id']}) of study {trial.get('study_id')}",
        "state": trial_state(trial),
        "value": trial_value(trial),
        "attempt": trial.get("attempt"),
        **({"resumed": f"{trial['resumes']} time(s) from a checkpoint"} if trial.get("resumes") else {}),
        "worker": trial.get("worker_id"),
        "started": trial.get("datetime_start"),
        "finished": trial.get("datetime_complete"),
        **({"fail reason": trial["fail_reason"]} if trial.get("fail_reason") else {}),
        **({"feasible": trial["feasible"]} if trial.get("feasible") is not None else {}),
    }, title=title))
    for name in ("params", "intermediate_values", "validation_metrics", "test_metrics", "constraints"):
        if trial.get(name):
            console.print(kv_table(trial[name], title=name.replace("_", " ")))


