"""Answer trials from recorded learning curves instead of training: search strategies compared on real curves.

A recording (`benchmarks/record_curves.py`) holds configurations trained to the full budget, with the
objective at fine rungs (every 10%), the final validation and test metrics and the optimizer steps
the training took. `ReplayTrainer` implements `tunefleet.workers.loop.Trainer`: for a leased trial it finds the
nearest recorded configuration and reports that configuration's curve at the lease's rungs, then
completes with its recorded final metrics — through the real server and protocol, in milliseconds.

Nearest configuration: each searched parameter of the recording's spec becomes one coordinate in
[0, 1] — a float or int range is scaled by its width (on log scale for `log: true`), a categorical
parameter contributes 0 when equal and 1 when not — and the distance is the Euclidean norm of the
coordinate differences. A parameter that does not matter for the queried configuration (`lora_r`
when the method is not LoRA, see INACTIVE_WHEN) is left out, so it cannot pull a full fine-tuning
query towards an unrelated neighbour. Ties go to the earliest recorded configuration.

Values between recorded percents are interpolated linearly; before the first recorded percent the
first recorded value is used (no score is recorded at 0%). A recorded percent is answered exactly.

The simulated clock is training steps: a trial stopped at p% of the budget consumed
`ceil(p / 100 × total_steps)` optimizer steps of its configuration, as `tunefleet.workers.training` counts a
rung. Each report carries `steps_used` in its metrics and the completion in `extra`; the trainer
also keeps the running total (`ReplayTrainer.steps_used`). Nothing sleeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunefleet.service.spec import Direction, objectives_of
from tunefleet.workers.errors import TrialFailed, TrialInterrupted
from tunefleet.workers.loop import ReportFn, TrialResult

__all__ = ["INACTIVE_WHEN", "RecordedConfig", "ReplayTable", "ReplayTrainer", "interpolate", "steps_at"]

# Parameters that have no effect unless a predicate of the configuration holds.
INACTIVE_WHEN: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "lora_r": lambda params: params.get("method", "lora") != "lora",
}


def interpolate(curve: Mapping[int, float], pct: float) -> float:
    """The curve's value at `pct` percent: exact at a recorded percent, linear between two, flat outside.

    Raises ValueError when the curve is empty.
    """
    if not curve:
        raise ValueError("the curve has no recorded point")
    points = sorted(curve.items())
    if pct <= points[0][0]:
        return float(points[0][1])
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if pct <= x1:
            return float(y0 + (y1 - y0) * (pct - x0) / (x1 - x0))
    return float(points[-1][1])


def steps_at(pct: float, total_steps: int) -> int:
    """Optimizer steps consumed when training stops at `pct` percent (the rung step tunefleet.workers.training uses)."""
    if pct <= 0:
        return 0
    return min(total_steps, max(1, math.ceil(total_steps * pct / 100)))


@dataclass(frozen=True)
class RecordedConfig:
    """One recorded configuration: its curve (percent → objective) and final results.

    `state` is COMPLETE or FAIL; a FAIL record has no final metrics and `fail_reason` says why.
    """

    index: int
    params: Mapping[str, Any]
    state: str
    curve: Mapping[int, float]
    total_steps: int
    validation_metrics: Mapping[str, Any] = field(default_factory=dict)
    test_metrics: Mapping[str, Any] = field(default_factory=dict)
    rung_metrics: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    fail_reason: str | None = None

    def value_at(self, pct: float) -> float:
        """The objective at `pct` percent of the budget (see `interpolate`)."""
        return interpolate(self.curve, pct)

    def metrics_at(self, pct: float) -> dict[str, float]:
        """Every metric recorded at the rungs, interpolated to `pct` like the objective."""
        names = sorted({name for metrics in self.rung_metrics.values() for name in metrics})
        out = {}
        for name in names:
            series = {p: m[name] for p, m in self.rung_metrics.items() if name in m}
            out[name] = interpolate(series, pct)
        return out

    def steps_at(self, pct: float) -> int:
        """Optimizer steps this configuration consumed by `pct` percent of its budget."""
        return steps_at(pct, self.total_steps)


class ReplayTable:
    """A loaded recording: its spec (with the searched space), its rungs, its configurations.

    Build one with `ReplayTable.load(path)` or directly from records (tests).
    """

    def __init__(self, records: Iterable[RecordedConfig], spec: Mapping[str, Any],
                 meta: Mapping[str, Any] | None = None):
        self.records = list(records)
        if not self.records:
            raise ValueError("a replay table needs at least one recorded configuration")
        self.spec = dict(spec)
        self.meta = dict(meta or {})
        self.space: dict[str, Mapping[str, Any]] = dict(self.spec["search_space"])
        # The first objective is the one a recording's curves hold.
        self.metric, direction = objectives_of(self.spec)[0]
        self.direction: Direction = "minimize" if direction == "minimize" else "maximize"

    @classmethod
    def load(cls, path: str | Path) -> ReplayTable:
        """Read `<name>.jsonl` and its sidecar `<name>.meta.json` (either path may be given).

        Raises FileNotFoundError when either file is missing, ValueError when a line is not a record.
        """
        path = Path(path)
        stem = path.with_suffix("") if path.suffix == ".jsonl" else Path(str(path).removesuffix(".meta.json"))
        jsonl, meta_path = stem.with_suffix(".jsonl"), Path(f"{stem}.meta.json")
        if not jsonl.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"a recording is {jsonl} plus {meta_path}; record one with "
                                    "benchmarks/record_curves.py")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        raw = []
        lines = jsonl.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):  # torn by a killed recorder: the line is being written
                    continue
                raise ValueError(f"{jsonl}:{number} is not JSON: {exc}") from exc
        return cls(_records_from_raw(raw), meta["spec"], meta)

    # -- lookups ------------------------------------------------------------------------------------

    @property
    def complete(self) -> list[RecordedConfig]:
        """The configurations that finished (the others failed when recorded)."""
        return [r for r in self.records if r.state == "COMPLETE"]

    def final(self, record: RecordedConfig) -> float:
        """The final validation objective of a COMPLETE record."""
        return float(record.validation_metrics[self.metric])

    def best_final(self) -> float:
        """The best final validation objective in the table: what an oracle would pick."""
        finals = [self.final(r) for r in self.complete]
        return max(finals) if self.direction == "maximize" else min(finals)

    def mean_total_steps(self) -> float:
        """The mean optimizer steps of a full-budget trial over the table's configurations."""
        return sum(r.total_steps for r in self.records) / len(self.records)

    def distance(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
        """The normalised distance between two configurations (see the module docstring).

        Parameters outside the searched space are ignored; raises KeyError when `a` lacks a searched one.
        """
        total = 0.0
        for name, param in self.space.items():
            inactive = INACTIVE_WHEN.get(name)
            if inactive is not None and inactive(a):
                continue
            total += _coordinate_gap(param, a[name], b.get(name)) ** 2
        return math.sqrt(total)

    def nearest(self, params: Mapping[str, Any]) -> tuple[RecordedConfig, float]:
        """The recorded configuration nearest to `params`, and its distance (0 for a recorded one)."""
        best, best_distance = self.records[0], math.inf
        for record in self.records:
            d = self.distance(params, record.params)
            if d < best_distance:  # strict: ties keep the earliest record
                best, best_distance = record, d
        return best, best_distance


def _coordinate_gap(param: Mapping[str, Any], x: Any, y: Any) -> float:
    """|x - y| on the parameter's [0, 1] coordinate; 1 for different categories or a missing value."""
    if y is None:
        return 1.0
    if param["type"] == "categorical":
        return 0.0 if x == y else 1.0
    low, high = float(param["low"]), float(param["high"])
    if param.get("log"):
        return abs(math.log(float(x)) - math.log(float(y))) / (math.log(high) - math.log(low))
    return abs(float(x) - float(y)) / (high - low)


def _records_from_raw(raw: Sequence[Mapping[str, Any]]) -> list[RecordedConfig]:
    complete_steps = [int(r["total_steps"]) for r in raw if r.get("state") == "COMPLETE"]
    # A failed recording has no step count: charge the median full trial, a neutral guess.
    fallback = sorted(complete_steps)[len(complete_steps) // 2] if complete_steps else 1
    return [
        RecordedConfig(
            index=int(r["index"]),
            params=dict(r["params"]),
            state=str(r.get("state", "COMPLETE")),
            curve={int(p): float(v) for p, v in (r.get("curve") or {}).items()},
            total_steps=int(r.get("total_steps") or fallback),
            validation_metrics=dict(r.get("validation_metrics") or {}),
            test_metrics=dict(r.get("test_metrics") or {}),
            rung_metrics={int(p): dict(m) for p, m in (r.get("rung_metrics") or {}).items()},
            fail_reason=r.get("fail_reason"),
        )
        for r in raw
    ]


class ReplayTrainer:
    """`tunefleet.workers.loop.Trainer` that answers each lease from a `ReplayTable` (see the module docstring).

    `steps_used` is the total of optimizer steps consumed by every trial run so far (the simulated
    clock). When `budget_steps` is given and a trial's end brings the total to it or beyond,
    `on_budget_spent()` is called once, before that trial's outcome is returned (a benchmark passes
    `WorkerLoop.request_shutdown`, so the loop completes this trial and then stops).
    """

    def __init__(self, table: ReplayTable, *, budget_steps: float | None = None,
                 on_budget_spent: Callable[[], None] | None = None):
        self.table = table
        self.budget_steps = budget_steps
        self.on_budget_spent = on_budget_spent
        self.steps_used = 0
        # One entry per run trial: trial_id, recorded index, distance, steps, state, last percent.
        self.trials: list[dict[str, Any]] = []

    def run(self, lease: Mapping[str, Any], report: ReportFn, should_stop: Callable[[], bool],
            workdir: Path) -> TrialResult:
        """Report the nearest recorded curve at the lease's rungs; prune, fail or complete like it did.

        Raises TrialInterrupted when `should_stop()` is set between rungs, and TrialFailed (not
        retryable) when the nearest configuration failed when it was recorded.
        """
        record, distance = self.table.nearest(lease["params"])
        trial_id = lease.get("trial_id")
        rungs = sorted(int(r) for r in (lease.get("rungs") or [100]))
        # A resumed trial continues after its checkpoint's rung and is charged only its extra steps.
        start = int(json.loads((Path(lease["resume_dir"]) / "replay.json").read_text())["step"]) \
            if lease.get("resume_dir") else 0
        last = start
        for rung in rungs:
            if rung <= start:
                continue
            if should_stop():
                self._charge(trial_id, record, distance, start, last, "INTERRUPTED")
                raise TrialInterrupted("stop requested")
            if record.state != "COMPLETE" and rung > max(record.curve, default=0):
                self._charge(trial_id, record, distance, start, last, "FAIL")
                raise TrialFailed(f"replayed failure: {record.fail_reason}", retryable=False)
            last = rung
            metrics = {**record.metrics_at(rung), "steps_used": float(record.steps_at(rung))}
            # The exact recorded objective, not the interpolated metrics' copy of it.
            metrics[self.table.metric] = value = record.value_at(rung)
            action = report(rung, value, metrics)
            if action == "prune":
                self._charge(trial_id, record, distance, start, rung, "PRUNED")
                return TrialResult(pruned=True, extra=self._extra(record, distance, rung))
            if action == "pause":
                self._charge(trial_id, record, distance, start, rung, "PAUSED")
                folder = Path(workdir) / "checkpoint"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "replay.json").write_text(json.dumps({"step": rung}))
                return TrialResult(paused_at=rung, checkpoint_dir=folder, extra=self._extra(record, distance, rung))
        if record.state != "COMPLETE":
            self._charge(trial_id, record, distance, start, last, "FAIL")
            raise TrialFailed(f"replayed failure: {record.fail_reason}", retryable=False)
        self._charge(trial_id, record, distance, start, 100, "COMPLETE")
        return TrialResult(
            value=self.table.final(record),
            validation_metrics=dict(record.validation_metrics),
            test_metrics=dict(record.test_metrics),
            extra=self._extra(record, distance, 100),
        )

    def _extra(self, record: RecordedConfig, distance: float, pct: int) -> dict[str, Any]:
        return {"steps_used": record.steps_at(pct), "total_steps": record.total_steps,
                "replay_index": record.index, "replay_distance": round(distance, 6), "simulated": True}

    def _charge(self, trial_id: Any, record: RecordedConfig, distance: float, start: int, pct: int,
                state: str) -> None:
        steps = record.steps_at(pct) - (record.steps_at(start) if start else 0)
        self.steps_used += steps
        self.trials.append({"trial_id": trial_id, "index": record.index, "distance": distance, "steps": steps,
                            "state": state, "pct": pct})
        if self.budget_steps is not None and self.steps_used >= self.budget_steps and self.on_budget_spent:
            callback, self.on_budget_spent = self.on_budget_spent, None
            callback()
