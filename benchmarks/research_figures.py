"""The research figures this project starts from, reproduced on a learning-curve recording.

1. How many of the top 5 configurations at the 20% rung are among the final top 5 — over the whole
   recording, and over random 10-configuration subsets (the size of the original experiment).
2. Rank correlation (Spearman, Kendall) between the score at each recorded rung and the final score.
3. Accuracy against training-set size (the data-efficiency curve) and the size where it saturates:
   the smallest size whose best final validation score is within `--tolerance` of the best size's.

Statistics come from `tunefleet.service.fidelity` (the same functions the per-study fidelity report uses).

    .venv/bin/python benchmarks/research_figures.py --table benchmarks/data/curves-bbc-minilm-v1.jsonl \
        --img docs/img --out /tmp/research.md
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from tunefleet.service.fidelity import kendall, spearman, top_k_overlap  # noqa: E402
from tunefleet.workers.replay import RecordedConfig, ReplayTable  # noqa: E402

__all__ = ["data_efficiency", "rank_by_rung", "saturation_size", "subset_top_k", "top_k_at"]

DEFAULT_TABLE = ROOT / "benchmarks" / "data" / "curves-bbc-minilm-v1.jsonl"


def _rungs(records: Sequence[RecordedConfig]) -> list[int]:
    """Percents recorded for every configuration, below 100."""
    common = set.intersection(*(set(r.curve) for r in records)) if records else set()
    return sorted(p for p in common if p < 100)


def rank_by_rung(table: ReplayTable, records: Sequence[RecordedConfig], k: int = 5) -> list[dict[str, Any]]:
    """Per recorded rung: Spearman and Kendall against the final score, and the top-k overlap.

    Returns [] for fewer than two configurations; `overlap` is None when there are fewer than k.
    """
    if len(records) < 2:
        return []
    final = [table.final(r) for r in records]
    rows = []
    for pct in _rungs(records):
        at = [r.value_at(pct) for r in records]
        overlap = top_k_overlap(at, final, k, table.direction)[0] if len(records) >= k else None
        rows.append({"rung": pct, "spearman": spearman(at, final), "kendall": kendall(at, final),
                     "overlap": overlap, "k": k, "n": len(records)})
    return rows


def top_k_at(table: ReplayTable, records: Sequence[RecordedConfig], pct: int, k: int = 5) -> int:
    """How many of the k best at `pct` percent are among the k best final; raises ValueError if < k records."""
    return top_k_overlap([r.value_at(pct) for r in records], [table.final(r) for r in records], k,
                         table.direction)[0]


def subset_top_k(table: ReplayTable, records: Sequence[RecordedConfig], pct: int, *, size: int = 10, k: int = 5,
                 draws: int = 2000, seed: int = 0) -> dict[int, float]:
    """Distribution of the top-k overlap at `pct` over random subsets of `size` configurations.

    The original experiment had 10 configurations: this says how often it would have seen 4 of 5 (or
    any other count) had it drawn its 10 from this recording. Returns {overlap: share of draws}.
    Raises ValueError when there are fewer than `size` records or size < k.
    """
    if len(records) < size or size < k:
        raise ValueError(f"need at least {size} configurations (and size >= k), have {len(records)}")
    rng = np.random.default_rng(seed)
    at = np.array([r.value_at(pct) for r in records])
    final = np.array([table.final(r) for r in records])
    counts: dict[int, int] = {}
    for _ in range(draws):
        pick = rng.choice(len(records), size=size, replace=False)
        overlap = top_k_overlap(at[pick].tolist(), final[pick].tolist(), k, table.direction)[0]
        counts[overlap] = counts.get(overlap, 0) + 1
    return {o: counts[o] / draws for o in sorted(counts)}


def data_efficiency(table: ReplayTable, records: Sequence[RecordedConfig], param: str = "train_size",
                    top: int = 3) -> list[dict[str, Any]]:
    """Per value of `param` (training-set size): configurations, best final validation and its test score,
    and the mean final validation of the `top` best (less noisy than the single best)."""
    groups: dict[Any, list[RecordedConfig]] = {}
    for r in records:
        groups.setdefault(r.params.get(param), []).append(r)
    sign = 1.0 if table.direction == "maximize" else -1.0
    rows = []
    for size in sorted(g for g in groups if g is not None):
        ranked = sorted(groups[size], key=lambda r: -sign * table.final(r))
        best = ranked[0]
        rows.append({"size": size, "n": len(ranked), "best_val": table.final(best),
                     "best_test": best.test_metrics.get(table.metric),
                     f"top{top}_val": float(np.mean([table.final(r) for r in ranked[:top]])),
                     "best_params": dict(best.params)})
    return rows


def saturation_size(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.01, key: str = "best_val",
                    direction: str = "maximize") -> Any:
    """The smallest size whose `key` is within `tolerance` of the best size's; None for no rows."""
    if not rows:
        return None
    values = [row[key] for row in rows]
    best = max(values) if direction == "maximize" else min(values)
    for row in rows:  # rows are sorted by size
        if abs(best - row[key]) <= tolerance:
            return row["size"]
    return None


# -- plots -------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rank_by_rung(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Spearman and Kendall by rung, one pair of lines per subset (e.g. all sizes, largest size)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in series.items():
        if not rows:
            continue
        x = [r["rung"] for r in rows]
        line = ax.plot(x, [r["spearman"] for r in rows], "o-", label=f"Spearman, {name}")[0]
        ax.plot(x, [r["kendall"] for r in rows], "s--", color=line.get_color(), label=f"Kendall, {name}")
    ax.set_xlabel("rung (% of the training budget)")
    ax.set_ylabel("rank correlation with the final score")
    ax.set_ylim(-0.2, 1.0)
    ax.axvline(20, color="grey", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("How well an early rung ranks the final validation accuracy")
    return _save(fig, path)


def plot_data_efficiency(rows: Sequence[Mapping[str, Any]], saturation: Any, path: Path, metric: str) -> Path:
    """Best final validation (and its test score) and the top-3 mean against training-set size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r["size"] for r in rows]
    ax.plot(sizes, [r["best_val"] for r in rows], "o-", label=f"best final validation {metric}")
    ax.plot(sizes, [r["top3_val"] for r in rows], "^--", label="mean of the 3 best (validation)")
    ax.plot(sizes, [r["best_test"] for r in rows], "s:", label="test score of the best")
    if saturation is not None:
        ax.axvline(saturation, color="grey", ls=":", label=f"saturates at {saturation}")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("training examples")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Data efficiency: accuracy against training-set size")
    return _save(fig, path)


def plot_curves(table: ReplayTable, records: Sequence[RecordedConfig], path: Path) -> Path:
    """Every recorded learning curve, coloured by method, one panel per training-set size."""
    plt = _plt()
    sizes = sorted({int(r.params["train_size"]) for r in records if r.params.get("train_size") is not None})
    panels = max(1, len(sizes))
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.6), sharey=True, squeeze=False)
    colours = {"lora": "tab:blue", "full": "tab:orange"}
    panel_sizes: list[int | None] = [*sizes] or [None]
    for ax, size in zip(axes[0], panel_sizes, strict=False):
        for r in records:
            if size is not None and r.params.get("train_size") != size:
                continue
            pts = sorted(r.curve.items())
            ax.plot([p for p, _ in pts], [v for _, v in pts], color=colours.get(str(r.params.get("method")), "grey"),
                    alpha=0.6, lw=1)
        ax.set_title(f"train_size {size}" if size is not None else "all")
        ax.set_xlabel("% of budget")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"validation {table.metric}")
    handles = [plt.Line2D([], [], color=c, label=m) for m, c in colours.items()]
    axes[0][-1].legend(handles=handles, fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- report ------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def report(table: ReplayTable, img: Path | None, tolerance: float = 0.01, first_rung: int = 20) -> str:
    """All three figures as markdown (and PNGs under `img` when given)."""
    records = table.complete
    largest = max((r.params.get("train_size") or 0 for r in records), default=0)
    subsets = {"all sizes": records, f"train_size {largest}": [r for r in records
                                                               if r.params.get("train_size") == largest]}
    lines = [f"Recording: {len(table.records)} configurations ({len(records)} complete).", ""]
    lines += [f"| subset | n | top-5 at {first_rung}% in final top-5 |", "|---|---|---|"]
    for name, rs in subsets.items():
        overlap = top_k_at(table, rs, first_rung) if len(rs) >= 5 else None
        lines.append(f"| {name} | {len(rs)} | {overlap if overlap is not None else '–'} / 5 |")
    if len(records) >= 10:
        dist = subset_top_k(table, records, first_rung)
        mean = sum(o * p for o, p in dist.items())
        shares = ", ".join(f"{o}/5: {p:.0%}" for o, p in dist.items())
        lines += ["", f"Random 10-configuration subsets (2,000 draws, as in the original experiment): mean "
                      f"overlap {mean:.2f} of 5; {shares}."]
    by_rung = {name: rank_by_rung(table, rs) for name, rs in subsets.items()}
    lines += ["", "| rung | " + " | ".join(f"Spearman ({n}) | Kendall ({n}) | top-5 ({n})" for n in subsets) + " |",
              "|---|" + "---|---|---|" * len(subsets)]
    for i, row in enumerate(by_rung["all sizes"]):
        cells = [f"{row['rung']}%"]
        for name in subsets:
            rows = by_rung[name]
            r = rows[i] if i < len(rows) else {}
            cells += [_fmt(r.get("spearman")), _fmt(r.get("kendall")),
                      f"{r['overlap']}/5" if r.get("overlap") is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    eff = data_efficiency(table, records)
    saturation = saturation_size(eff, tolerance, direction=table.direction)
    lines += ["", f"| train_size | configurations | best final val {table.metric} | its test | mean of 3 best val |",
              "|---|---|---|---|---|"]
    for row in eff:
        lines.append(f"| {row['size']} | {row['n']} | {_fmt(row['best_val'], 3)} | {_fmt(row['best_test'], 3)} | "
                     f"{_fmt(row['top3_val'], 3)} |")
    verdict = f"{saturation}"
    if eff and saturation == eff[-1]["size"] and len(eff) > 1:
        verdict += " — the largest size recorded, so no saturation within the recorded range: still rising"
    lines += ["", f"Saturation (smallest size within {tolerance:.2f} of the best size's best validation score): "
                  f"{verdict}."]
    if img is not None:
        plot_rank_by_rung(by_rung, img / "rank_correlation_by_rung.png")
        plot_data_efficiency(eff, saturation, img / "data_efficiency.png", table.metric)
        plot_curves(table, records, img / "learning_curves.png")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--img", type=Path, help="write the PNG figures into this folder")
    parser.add_argument("--out", type=Path, help="write the markdown here as well as printing it")
    parser.add_argument("--tolerance", type=float, default=0.01, help="saturation: within this of the best")
    args = parser.parse_args(argv)
    text = report(ReplayTable.load(args.table), args.img, args.tolerance)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
