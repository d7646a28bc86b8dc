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

__all__ = ["download_artifacts", "model_card"]


@command(study_app, "export")
def study_export(
    ctx: typer.Context,
    study_id: StudyId,
    dest: Annotated[Path, typer.Option("--best", metavar="DIR", help="Folder for the best trial's files.")],
) -> None:
    """Download the best trial's artifacts (adapter, logs) into DIR with a model card README.md."""
    client = client_for(ctx)
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
    lines = ["---", f"base_model: {spec.get('model') or 'unknown'}",  # a script study may name no model
             *(["library_name: peft"] if has_adapter else []), "tags: [tunefleet, optuna]", "---", "",
             f"# {study['name']}: best trial #{trial.get('number')}", "",
             f"Fine-tuned from `{spec.get('model') or 'unknown'}` for {spec.get('task')}, selected by tunefleet study "
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


