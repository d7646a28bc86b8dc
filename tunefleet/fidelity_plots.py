"""Drawing the fidelity report: PNG plots, and one self-contained HTML page or one PNG sheet.

Client-side composition code (the demo and scripts use it; the server never draws). The numbers come
from `tunefleet.service.fidelity.fidelity_report`; this module only draws them. Optuna's matplotlib plots
are used for the optimisation history, the intermediate values and the parameter importances; only the
rung-vs-final scatter is ours. Rendering is headless (Agg) and serialised by a lock, because pyplot keeps
global state that is not thread-safe and a caller may draw from several threads.
"""

from __future__ import annotations

import base64
import html
import io
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tunefleet.service.fidelity import FINAL_STEP, TrialRecord, records_from_study

__all__ = ["MIN_TRIALS_FOR_IMPORTANCES", "PLOTS", "importances_title", "render_plots", "render_report",
           "report_html"]

matplotlib.use("Agg")  # headless: the server and the CLI never open a window
import matplotlib.pyplot as plt  # noqa: E402  (pyplot must come after the backend is chosen)

Format = Literal["html", "png"]
_LOCK = threading.Lock()
_DPI = 110
# Below this many completed trials an importance ranking mostly reflects which values the sampler happened
# to try: the plot and table say so (the same threshold as the report's warning on rank correlations).
MIN_TRIALS_FOR_IMPORTANCES = 10
_STATE_STYLE = {  # how each trial state is drawn in the intermediate-values plot
    "COMPLETE": {"linestyle": "-", "alpha": 0.9},
    "PRUNED": {"linestyle": "--", "alpha": 0.6, "color": "#888888"},
    "RUNNING": {"linestyle": ":", "alpha": 0.6, "color": "#4477aa"},
}


def _placeholder(title: str, message: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return fig


def _optimization_history(study: optuna.Study, records: Sequence[TrialRecord],
                          report: Mapping[str, Any]) -> Figure:
    if not any(t.final is not None for t in records):
        return _placeholder("Optimisation history", "no trial has completed yet")
    ax = optuna.visualization.matplotlib.plot_optimization_history(
        study, **_target_kwargs(study, records, report))
    ax.set_ylabel(f"validation {report['objective_metric']}")
    return _figure_of(ax)


def _figure_of(ax: Any) -> Figure:
    """The top-level figure of an Optuna plot's axes (typed `Figure | SubFigure`; Optuna draws on a figure)."""
    figure = ax.figure
    assert isinstance(figure, Figure)
    return figure


def _target_kwargs(study: optuna.Study, records: Sequence[TrialRecord],
                   report: Mapping[str, Any]) -> dict[str, Any]:
    # Single-objective: Optuna's own value (and its best-so-far line). Multi-objective studies have
    # no single value, so plot the objective metric the report used.
    if len(study.directions) == 1:
        return {}
    finals = {t.number: t.final for t in records}

    def target(trial: optuna.trial.FrozenTrial) -> float:
        final = finals.get(trial.number)
        return float("nan") if final is None else final

    return {"target": target, "target_name": report["objective_metric"]}


def _intermediate_values(study: optuna.Study, records: Sequence[TrialRecord],
                         report: Mapping[str, Any]) -> Figure:
    if not any(t.intermediate for t in records):
        return _placeholder("Intermediate values", "no trial has reported at a rung yet")
    ax = optuna.visualization.matplotlib.plot_intermediate_values(study)
    states = {f"Trial{t.number}": t.state for t in records}
    # Optuna colours every trial alike; restyle by state so pruned trials stand out, and mark where
    # each pruned trial stopped.
    for line in ax.get_lines():
        state = states.get(str(line.get_label()), "COMPLETE")
        line.set(**_STATE_STYLE.get(state, _STATE_STYLE["COMPLETE"]))
        if state == "PRUNED":
            x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
            ax.plot(x[-1:], y[-1:], marker="x", color="#cc3311", markersize=8, linestyle="none")
    # One legend entry per trial is unreadable beyond a dozen trials: explain the styles instead.
    present = set(states.values())
    ax.legend(handles=[handle for state, handle in _legend_handles().items() if state in present],
              loc="best", fontsize="small")
    ax.set_xlabel("step (% of the training budget)")
    ax.set_ylabel(f"validation {report['objective_metric']} at the rung")
    return _figure_of(ax)


def _legend_handles() -> dict[str, Line2D]:
    return {"COMPLETE": Line2D([], [], color="#1f77b4", linestyle="-", label="complete"),
            "PRUNED": Line2D([], [], color="#888888", linestyle="--", marker="x", markeredgecolor="#cc3311",
                             label="pruned (× where it stopped)"),
            "RUNNING": Line2D([], [], color="#4477aa", linestyle=":", label="running")}


def _rung_vs_final(study: optuna.Study, records: Sequence[TrialRecord],
                   report: Mapping[str, Any]) -> Figure:
    rungs = [r for r in report["rungs"] if r["n"] > 0]
    if not rungs:
        return _placeholder("Rung score vs final score", "no completed trial reported at a rung")
    fig, axes = plt.subplots(1, len(rungs), figsize=(4.2 * len(rungs), 4.0), squeeze=False)
    complete = [t for t in records if t.final is not None]
    for ax, rung in zip(axes[0], rungs, strict=True):
        _scatter_rung(ax, rung, complete)
    fig.supylabel(f"final validation {report['objective_metric']}")
    fig.tight_layout()
    return fig


def _scatter_rung(ax: Any, rung: Mapping[str, Any], complete: Sequence[TrialRecord]) -> None:
    step = rung["step"]
    points = [(t.intermediate[step], t.final, t) for t in complete if step in t.intermediate]
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="#1f77b4", zorder=2)
    for x, y, trial in points:
        if trial.is_baseline:
            ax.scatter([x], [y], facecolors="none", edgecolors="#cc3311", s=140, zorder=3, label="baseline")
        # Trial numbers let a reader find the late bloomers in the trial list.
        ax.annotate(str(trial.number), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    rho = rung["spearman"]
    ax.set_title(f"step {step}%: Spearman {'n/a' if rho is None else f'{rho:.2f}'} (n={rung['n']})")
    ax.set_xlabel(f"score at step {step}%")
    ax.grid(alpha=0.3)
    if any(t.is_baseline for _, _, t in points):
        ax.legend(loc="lower right", fontsize="small")


def _param_importances(study: optuna.Study, records: Sequence[TrialRecord],
                       report: Mapping[str, Any]) -> Figure:
    if not report.get("importances"):
        return _placeholder("Parameter importances", "not available (see the report's warnings)")
    # The report computes importances of the single objective only, so Optuna's default target fits.
    ax = optuna.visualization.matplotlib.plot_param_importances(study)
    ax.set_title(importances_title(report))
    return _figure_of(ax)


def importances_title(report: Mapping[str, Any]) -> str:
    """The importances' title; it adds "from N completed trials: indicative only" when fewer than
    MIN_TRIALS_FOR_IMPORTANCES trials completed."""
    n = report.get("n_complete")
    if n is None or n >= MIN_TRIALS_FOR_IMPORTANCES:
        return "Parameter importances"
    return f"Parameter importances from {n} completed trials: indicative only"


# plot name (and PNG file stem) -> (caption, drawing function); a new plot is one entry here.
PLOTS: dict[str, tuple[str, Callable[[optuna.Study, Sequence[TrialRecord], Mapping[str, Any]], Figure]]] = {
    "optimization_history": ("Optimisation history", _optimization_history),
    "intermediate_values": ("Intermediate values per trial", _intermediate_values),
    "rung_vs_final": ("Rung score vs final score", _rung_vs_final),
    "param_importances": ("Parameter importances", _param_importances),
}


def render_plots(study: optuna.Study, report: Mapping[str, Any]) -> dict[str, bytes]:
    """Every plot of PLOTS as PNG bytes, keyed by plot name.

    `report` is `fidelity_report`'s answer for the same study. Thread-safe; leaves pyplot's style
    and open figures as it found them. Raises whatever matplotlib raises on a broken figure.
    """
    records = records_from_study(study, report["objective_metric"])
    pngs: dict[str, bytes] = {}
    # Optuna's plots switch pyplot to the ggplot style globally; style.context gives every plot the
    # same style whatever the order and restores the caller's settings afterwards.
    with _LOCK, plt.style.context("ggplot"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, (_, draw) in PLOTS.items():
            fig = draw(study, records, report)
            try:
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
                pngs[name] = buffer.getvalue()
            finally:
                plt.close(fig)  # a long-lived server would otherwise keep every figure alive
    return pngs


def render_report(study: optuna.Study, report: Mapping[str, Any], out_dir: Path,
                  fmt: Format = "html") -> Path:
    """Write the report under out_dir (created if missing) and return the main file's path.

    Always writes one PNG per plot (`<plot name>.png`). fmt="html" adds `report.html`, one file with
    the report's tables and the plots embedded as data URIs; fmt="png" adds `report.png`, the plots
    on one sheet. Raises ValueError for another fmt and OSError when out_dir cannot be written.
    """
    if fmt not in ("html", "png"):
        raise ValueError(f"fmt must be 'html' or 'png', got {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = render_plots(study, report)
    for name, data in pngs.items():
        (out_dir / f"{name}.png").write_bytes(data)
    if fmt == "png":
        path = out_dir / "report.png"
        path.write_bytes(_sheet(pngs, f"{study.study_name}: fidelity report"))
    else:
        path = out_dir / "report.html"
        path.write_text(report_html(study.study_name, report, pngs), encoding="utf-8")
    return path


def _sheet(pngs: Mapping[str, bytes], title: str) -> bytes:
    """The plots stacked on one PNG, each at its own pixel size, under a title."""
    images = [plt.imread(io.BytesIO(data), format="png") for data in pngs.values()]
    width = max(img.shape[1] for img in images)
    heights = [img.shape[0] for img in images]
    title_px = 50
    with _LOCK:
        fig, axes = plt.subplots(len(images), 1, figsize=(width / _DPI, (sum(heights) + title_px) / _DPI),
                                 dpi=_DPI, gridspec_kw={"height_ratios": heights}, squeeze=False)
        try:
            fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - title_px / (sum(heights) + title_px),
                                hspace=0)
            fig.suptitle(title)
            for ax, img in zip(axes[:, 0], images, strict=True):
                ax.imshow(img)
                ax.set_axis_off()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=_DPI)
            return buffer.getvalue()
        finally:
            plt.close(fig)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rungs_table(report: Mapping[str, Any]) -> str:
    rows = [[r["step"], r["n"], r["n_pruned_here"], r["spearman"], r["kendall"],
             _overlap(r, "top5"), _overlap(r, "top10pct")] for r in report["rungs"]]
    return _table(["step (%)", "trials", "pruned here", "Spearman", "Kendall", "top-5 overlap",
                   "top-10% overlap"], rows)


def _overlap(rung: Mapping[str, Any], name: str) -> str | None:
    overlap = rung[f"{name}_overlap"]
    return None if overlap is None else f"{overlap}/{rung[f'{name}_k']}"


def _trials_table(report: Mapping[str, Any]) -> str:
    rows = []
    for role in ("best_trial", "baseline"):
        trial = report.get(role)
        if trial:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial["params"].items())
            rows.append([role.replace("_", " "), trial["number"], trial["state"], trial["value"],
                         trial["test_value"], params])
    return _table(["", "trial", "state", "validation", "test", "parameters"], rows)


def _comparison_table(report: Mapping[str, Any]) -> str:
    c = report["tuned_vs_baseline"]
    ci = None if c["ci_low"] is None else f"[{c['ci_low']:.4g}, {c['ci_high']:.4g}]"
    return _table(["test metric", "tuned", "baseline", "tuned − baseline", f"{c['confidence']:.0%} CI",
                   "verdict", "method / reason"],
                  [[c["metric"], c["tuned"], c["baseline"], c["diff"], ci, c["verdict"],
                    c["method"] or c["reason"]]])


def _summary_table(report: Mapping[str, Any]) -> str:
    saved = report["steps_saved_fraction"]
    return _table(["trials", "complete", "pruned", "failed", "running", "training steps saved"],
                  [[report["n_trials"], report["n_complete"], report["n_pruned"], report["n_failed"],
                    report["n_running"], None if saved is None else f"{saved:.1%}"]])


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.warn{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}"""


def report_html(study_name: str, report: Mapping[str, Any], pngs: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: the report's tables, warnings and the PNGs as data URIs."""
    title = html.escape(f"{study_name}: fidelity report")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
             f"<style>{_CSS}</style></head><body><h1>{title}</h1>",
             f"<p>Objective: validation {html.escape(report['objective_metric'])} "
             f"({html.escape(report['direction'])}); final step = {FINAL_STEP}% of the budget.</p>"]
    if report["warnings"]:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"])
        parts.append(f"<div class='warn'><b>Read with care</b><ul>{items}</ul></div>")
    parts += ["<h2>Trials</h2>", _summary_table(report),
              "<h2>How well each rung ranked the final score</h2>", _rungs_table(report),
              "<h2>Tuned vs baseline on the test set</h2>", _comparison_table(report),
              _trials_table(report)]
    if report.get("importances"):
        parts += [f"<h2>{html.escape(importances_title(report))}</h2>",
                  _table(["parameter", "importance"], list(report["importances"].items()))]
    for name, data in pngs.items():
        caption = html.escape(PLOTS[name][0] if name in PLOTS else name)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f"<h2>{caption}</h2><img alt='{caption}' src='{uri}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
