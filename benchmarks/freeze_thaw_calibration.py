"""How well freeze-thaw's two models are calibrated on a recording (docs/search_quality.md, §4).

Freeze-thaw (`tunefleet.service.freeze_thaw`) scores every option by the expected improvement (EI) of its final
over the incumbent. Two models feed it, and both can be checked on recorded curves without any search:

- the **conversion model** (a trial's final given its value at a rung, fitted on the study's completed trials):
  fit it on n recorded configurations drawn at random, predict the final of 10 others from their value at the
  rung, and count how often the truth falls in the central 50% and 90% intervals and above the 95th percentile;
- the **new configuration's EI** (a kernel density over the finals seen so far, Silverman's bandwidth): with n
  finals seen, compare the policy's EI and chance of beating the best with what a further random configuration
  of the recording really brings, and with the leave-one-out estimate (the improvement each seen final made
  over the others, averaged: (best − second best) / n), which assumes only that configurations are exchangeable.

    .venv/bin/python benchmarks/freeze_thaw_calibration.py --table benchmarks/data/curves-bbc-minilm-v1.jsonl
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np
import optuna
from optuna.distributions import FloatDistribution

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from tunefleet.service.freeze_thaw import ConversionModel, _silverman, expected_improvement  # noqa: E402
from tunefleet.service.storage import trial_storage_id  # noqa: E402
from tunefleet.workers.replay import ReplayTable  # noqa: E402

DEFAULT_TABLE = ROOT / "benchmarks" / "data" / "curves-bbc-minilm-v1.jsonl"
SIZES = (2, 3, 5, 8, 15)  # completed trials (or finals seen) when the model is asked


def _as_trials(n: int) -> list[optuna.trial.FrozenTrial]:
    """n completed trials with storage ids, as the model reads them (their values are passed separately)."""
    study = optuna.create_study()
    for _ in range(n):
        study.add_trial(optuna.trial.create_trial(value=0.0, params={"x": 0.0},
                                                  distributions={"x": FloatDistribution(0, 1)}))
    return study.get_trials()


def conversion_calibration(table: ReplayTable, rung: int, n: int, repeats: int,
                           rng: np.random.Generator) -> tuple[float, float, float]:
    """(coverage of the central 50% interval, of the 90% interval, share above the 95th percentile) of the
    conversion model fitted on `n` random configurations, predicting 10 others at a time from `rung`."""
    records = table.complete
    first = min(min(r.curve) for r in records if r.curve)
    spread = float(np.std([r.value_at(max(first, 20)) for r in records]))
    normal = NormalDist()
    pits: list[float] = []
    for _ in range(repeats):
        order = rng.permutation(len(records))
        trials = _as_trials(len(records))
        ids = [trial_storage_id(t) for t in trials]
        values = {ids[i]: {rung: records[j].value_at(rung)} for i, j in enumerate(order)}
        finals = {ids[i]: table.final(records[j]) for i, j in enumerate(order[:n])}
        model = ConversionModel(trials[:n], values, finals, spread, 100)
        for i in range(n, min(n + 10, len(records))):
            mean, std = model.predict(values[ids[i]][rung], rung)
            pits.append(normal.cdf((table.final(records[order[i]]) - mean) / std))
    p = np.array(pits)
    return float(np.mean(np.abs(p - 0.5) < 0.25)), float(np.mean(np.abs(p - 0.5) < 0.45)), float(np.mean(p > 0.95))


def new_configuration_ei(table: ReplayTable, n: int, repeats: int,
                         rng: np.random.Generator) -> tuple[float, float, float, float, float]:
    """(policy's EI, policy's chance of beating the best, leave-one-out EI, true EI, true chance), mean over
    `repeats` draws of `n` seen finals; "true" is over the recording's other configurations."""
    finals = np.array([table.final(r) for r in table.complete])
    out = []
    for _ in range(repeats):
        order = rng.permutation(len(finals))
        seen, rest = finals[order[:n]], finals[order[n:]]
        best = float(seen.max())
        bandwidth = max(_silverman(seen), 1e-9)
        scored = [expected_improvement(float(m), bandwidth, best) for m in seen]
        ranked = np.sort(seen)
        out.append((np.mean([ei for ei, _ in scored]), np.mean([p for _, p in scored]),
                    (ranked[-1] - ranked[-2]) / n, np.mean(np.maximum(rest - best, 0.0)), np.mean(rest > best)))
    return tuple(float(x) for x in np.mean(out, axis=0))  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = ReplayTable.load(args.table)
    rng = np.random.default_rng(args.seed)
    print("| rung | completed trials | 50% interval covers | 90% interval covers | above the 95th percentile |")
    print("|---|---|---|---|---|")
    for rung in (20, 60):
        for n in SIZES:
            c50, c90, tail = conversion_calibration(table, rung, n, args.repeats, rng)
            print(f"| {rung}% | {n} | {c50:.2f} | {c90:.2f} | {tail:.2f} |")
    print()
    print("| finals seen | policy's EI | leave-one-out EI | true EI | policy's P(beat best) | true P(beat best) |")
    print("|---|---|---|---|---|---|")
    for n in SIZES[1:]:
        ei, p, loo, true_ei, true_p = new_configuration_ei(table, n, 10 * args.repeats, rng)
        print(f"| {n} | {ei:.4f} | {loo:.4f} | {true_ei:.4f} | {p:.3f} | {true_p:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
