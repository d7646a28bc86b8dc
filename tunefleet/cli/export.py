"""`tunefleet study export`: the best trial's files and a model card."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tunefleet.cli.app import CliError, client_for, command, study_app
from tunefleet.cli.render import console, fmt
from tunefleet.cli.studies import StudyId
from tunefleet.service.client import Client
from tunefleet.service.refs import SCHEME, is_remote, looks_like_local_path, parse_ref

__all__ = ["download_artifacts", "model_card"]


@command(study_app, "export")
def study_export(
    ctx: typer.Context,
    study_id: StudyId,
    best_dest: Annotated[Path | None, typer.Option("--best", metavar="DIR",
                                                   help="Folder for the best trial's files.")] = None,
    number: Annotated[int | None, typer.Option("--trial", metavar="N", min=0,
                                               help="Export trial number N of the study instead (the # that "
                                               "`study show` and `trial ls` list), e.g. one of a Pareto front; "
                                               "needs --out.")] = None,
    out: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="Folder for trial N's files.")] = None,
) -> None:
    """Download the best trial's artifacts (adapter, logs), or those of trial N, into DIR with a model card
    README.md. A multi-objective study has no single best: choose a trial of its Pareto front with --trial."""
    client = client_for(ctx)
    study = client.get_study(study_id)
    if (best_dest is None) == (number is None) or (number is not None) != (out is not None):
        raise CliError("give either --best DIR, or --trial N with --out DIR")
    trial, dest = (_best_trial(study) if number is None else _trial_number(client, study, number),
                   best_dest or out)
    assert dest is not None  # checked above
    baseline = client.get_trial(study["baseline_trial_id"]) if study.get("baseline_trial_id") else None
    names = download_artifacts(client, trial["id"], dest)
    (dest / "README.md").write_text(model_card(study, trial, baseline, names))
    console.print(f"[green]exported[/] trial #{trial.get('number')} (id {trial['id']}): {len(names)} file(s) "
                  f"and README.md into [bold]{escape(str(dest))}[/]")


def _best_trial(study: Mapping[str, Any]) -> Mapping[str, Any]:
    """The study's best trial; a multi-objective study's only if its Pareto front holds one trial."""
    front = study.get("best_trials") or []
    if study.get("best_trial") or len(front) == 1:
        return study.get("best_trial") or front[0]
    if front:
        numbers = ", ".join(str(t.get("number")) for t in front)
        raise CliError(f"study {study['id']} has {len(front)} trials on its Pareto front ({numbers}): choose one "
                       f"with --trial N --out DIR (`tunefleet study show {study['id']}` compares them)")
    raise CliError(f"study {study['id']} has no completed trial yet: nothing to export")


def _trial_number(client: Client, study: Mapping[str, Any], number: int) -> Mapping[str, Any]:
    """Trial number `number` of the study, if it completed; CliError otherwise."""
    items = client.list_trials(study["id"], limit=1, offset=number)["items"]
    if not items:
        raise CliError(f"study {study['id']} has no trial #{number}: `tunefleet trial ls {study['id']}` lists them")
    trial: Mapping[str, Any] = items[0]
    if trial.get("state") != "COMPLETE":
        raise CliError(f"trial #{number} of study {study['id']} is {trial.get('state')}: only a completed trial "
                       "has a final model to export")
    return trial


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
        client.download_artifact_to(trial_id, artifact["name"], target)  # streamed: a full model may be GBs
        names.append(artifact["name"])
    return names


def model_card(study: Mapping[str, Any], trial: Mapping[str, Any], baseline: Mapping[str, Any] | None,
               files: list[str]) -> str:
    """A Markdown model card (with Hugging Face front matter) for an exported trial."""
    spec = study.get("spec") or {}
    objectives = spec.get("objective")
    has_adapter = any(name.startswith("adapter/") for name in files)
    base = base_model(str(spec.get("model") or ""))
    lines = ["---", *([f"base_model: {base}"] if base else []),
             *(["library_name: peft"] if has_adapter else []), "tags: [tunefleet, optuna]", "---", "",
             f"# {study['name']}: trial #{trial.get('number')}", "",
             f"Fine-tuned from `{_model_shown(str(spec.get('model') or 'unknown'))}` for {spec.get('task')}, "
             "selected by tunefleet study "
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


def base_model(model: str) -> str | None:
    """What the model card's `base_model` says: the hub id, or the name of an uploaded model, as the user gave
    it; None for a local folder or a remote URI, whose path means nothing on another machine."""
    try:
        ref = parse_ref(model)
    except ValueError:
        return None
    if ref is not None:
        return ref.name
    return None if (looks_like_local_path(model) or is_remote(model) or not model) else model


def _model_shown(model: str) -> str:
    """The model as the card's text names it: an uploaded one with its version, a local folder by its name."""
    ref = parse_ref(model) if model.startswith(SCHEME) else None
    if ref is not None:
        return f"{ref.name} (uploaded model, version {ref.version})"
    return f"a local folder named {Path(model).name}" if looks_like_local_path(model) else model


# The transformers class that loads a fully fine-tuned model of each task.
AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification", "causal-lm": "AutoModelForCausalLM",
                "sft": "AutoModelForCausalLM"}


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


