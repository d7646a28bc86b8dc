"""The replay worker (recorded curves answered through the real server), the recorder's design, and the
strategy benchmark and research figures on the small SYNTHETIC table, all in seconds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.record_curves import RECORD_RUNGS, sample_configs, synthetic_spec, write_synthetic
from benchmarks.research_figures import data_efficiency, rank_by_rung, saturation_size, subset_top_k
from benchmarks.strategies import QUICK, anytime, run_benchmark, study_spec_for, summarise
from tests.conftest import LiveServer
from tunefleet.service.client import Client
from tunefleet.workers.loop import WorkerLoop
from tunefleet.workers.replay import RecordedConfig, ReplayTable, ReplayTrainer, interpolate, steps_at

TINY = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "curves-synthetic-tiny.jsonl"


@pytest.fixture(scope="module")
def table() -> ReplayTable:
    return ReplayTable.load(TINY)


def _record(index: int, params: dict, final: float = 0.8, steps: int = 10) -> RecordedConfig:
    return RecordedConfig(index=index, params=params, state="COMPLETE", curve={10: 0.1, 50: 0.5, 100: final},
                          total_steps=steps, validation_metrics={"accuracy": final}, test_metrics={"accuracy": 0.7})


def test_replay_reproduces_a_recorded_curve_exactly_through_the_server(server: LiveServer, table: ReplayTable,
                                                                       tmp_path: Path) -> None:
    recorded = max(table.complete, key=table.final)
    # The recorded configuration is the study's baseline, so the first leased trial has exactly its
    # parameters; rungs at every recorded percent, no pruning.
    spec = study_spec_for(table, "replay-exact", "random", "none", seed=0)
    spec["baseline"] = dict(recorded.params)
    spec["search"]["rungs"] = RECORD_RUNGS
    spec["budget"] = {"max_trials": 1}
    with Client(server.url) as client:
        study = client.create_study(spec)
        trainer = ReplayTrainer(table)
        loop = WorkerLoop(client, trainer, worker_id="replay", device="cpu", once=True, idle_sleep=0.05,
                          workdir=tmp_path)
        assert loop.run() == 1
        (trial,) = client.list_trials(study["id"])["items"]

    assert trial["state"] == "COMPLETE" and trial["params"] == dict(recorded.params)
    assert {int(k): v for k, v in trial["intermediate_values"].items()} == dict(recorded.curve)
    assert trial["value"] == table.final(recorded)
    assert trial["validation_metrics"] == dict(recorded.validation_metrics)
    assert trial["test_metrics"] == dict(recorded.test_metrics)
    assert trial["extra"]["steps_used"] == recorded.total_steps == trainer.steps_used
    assert trial["extra"]["replay_index"] == recorded.index and trial["extra"]["replay_distance"] == 0
    assert trial["rung_metrics"]["20"]["steps_used"] == math.ceil(0.2 * recorded.total_steps)


def test_nearest_uses_normalised_log_scale_categories_and_ignores_inactive_lora_r() -> None:
    spec = synthetic_spec()
    base = {"method": "lora", "learning_rate": 1e-4, "lora_r": 8, "weight_decay": 0.0, "warmup_ratio": 0.1,
            "train_size": 100}
    records = [
        _record(0, base),
        _record(1, {**base, "learning_rate": 3e-4}),
        _record(2, {**base, "method": "full", "lora_r": 4}),
        _record(3, {**base, "method": "full", "lora_r": 16}),
    ]
    table = ReplayTable(records, spec)
    assert table.nearest(base) == (records[0], 0.0)
    # One decade of learning rate is 1/log10(300) of the log range, whatever the absolute values.
    assert table.distance(base, {**base, "learning_rate": 1e-3}) == pytest.approx(1 / math.log10(300))
    assert table.distance(base, {**base, "weight_decay": 0.1}) == 1.0
    assert table.nearest({**base, "learning_rate": 2.5e-4})[0] is records[1]
    # For full fine-tuning lora_r does not matter: both full records tie, the earliest wins.
    query = {**base, "method": "full", "lora_r": 16}
    assert table.distance(query, records[2].params) == table.distance(query, records[3].params) == 0.0
    assert table.nearest(query)[0] is records[2]


def test_interpolation_and_step_clock() -> None:
    curve = {10: 0.2, 20: 0.4, 100: 0.9}
    assert interpolate(curve, 20) == 0.4
    assert interpolate(curve, 15) == pytest.approx(0.3)
    assert interpolate(curve, 60) == pytest.approx(0.65)
    assert interpolate(curve, 5) == 0.2 and interpolate(curve, 100) == 0.9
    with pytest.raises(ValueError):
        interpolate({}, 50)
    assert [steps_at(p, 13) for p in (0, 10, 20, 100)] == [0, 2, 3, 13]


def test_replay_trainer_prunes_charges_steps_and_stops_on_budget(table: ReplayTable, tmp_path: Path) -> None:
    spent: list[int] = []
    trainer = ReplayTrainer(table, budget_steps=1, on_budget_spent=lambda: spent.append(1))
    record = table.records[0]
    lease = {"params": dict(record.params), "rungs": [20, 60, 100]}
    reports: list[tuple[int, float]] = []

    def prune_at_60(step: int, value: float, metrics: dict) -> str:
        reports.append((step, value))
        return "prune" if step == 60 else "continue"

    outcome = trainer.run(lease, prune_at_60, lambda: False, tmp_path)
    assert outcome.pruned and [s for s, _ in reports] == [20, 60]
    assert reports[0][1] == record.curve[20]
    assert trainer.steps_used == math.ceil(0.6 * record.total_steps) and spent == [1]
    trainer.run(lease, lambda *_: "continue", lambda: False, tmp_path)
    assert spent == [1], "the budget callback fires once"


def test_design_is_seeded_growable_and_balanced_in_train_size() -> None:
    space = synthetic_spec()["search_space"]
    long, short = sample_configs(space, 24, seed=3), sample_configs(space, 8, seed=3)
    assert long[:8] == short and sample_configs(space, 24, seed=4) != long
    sizes = [c["train_size"] for c in long]
    assert all(sizes.count(s) == 6 for s in space["train_size"]["choices"])
    for c in long:
        assert 1e-5 <= c["learning_rate"] <= 3e-3 and c["method"] in ("lora", "full")


def test_synthetic_table_is_labelled_and_reloads(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path / "tiny", n=6, seed=0)
    table = ReplayTable.load(path)
    assert table.meta["synthetic"] is True and len(table.records) == 6
    assert all(set(r.curve) == set(RECORD_RUNGS) for r in table.records)


def test_benchmark_quick_mode_on_the_tiny_table(table: ReplayTable) -> None:
    runs = run_benchmark(table, QUICK, [0, 1], 6.0, progress=lambda _: None)
    assert sorted((r.strategy, r.seed) for r in runs) == sorted((s, seed) for s in QUICK for seed in (0, 1))
    budget = 6.0 * table.mean_total_steps()
    for run in runs:
        steps = [e.steps_end for e in run.evaluations]
        assert steps == sorted(steps) and steps[-1] >= budget, "each run spends its whole budget"
        val, test = anytime(run, [0.25, 0.5, 1.0])
        finite = val[np.isfinite(val)]
        assert (np.diff(finite) >= 0).all() and 0 < finite[-1] <= table.best_final()
        assert np.isfinite(test[-1])
    rows = summarise(runs, table)
    assert {row["strategy"] for row in rows} == set(QUICK)
    reference = next(row for row in rows if row["strategy"] == "tpe-full")
    assert reference["ratio"] == pytest.approx(1.0) or math.isinf(reference["median_fraction"])
    for row in rows:
        mean, half = row["val@1"]
        assert 0 < mean <= table.best_final() and half >= 0


def test_peer_adapter_smac_on_the_tiny_table(table: ReplayTable) -> None:
    pytest.importorskip("smac")
    (run,) = run_benchmark(table, ["smac-mf"], [0], 4.0, progress=lambda _: None)
    assert run.evaluations[-1].steps_end >= 4.0 * table.mean_total_steps()
    assert any(e.final is not None for e in run.evaluations)


def test_research_figures_on_the_tiny_table(table: ReplayTable) -> None:
    rows = rank_by_rung(table, table.complete)
    assert [r["rung"] for r in rows] == [p for p in RECORD_RUNGS if p < 100]
    assert all(-1 <= r["spearman"] <= 1 and 0 <= r["overlap"] <= 5 for r in rows)
    assert rows[-1]["spearman"] >= rows[0]["spearman"], "later rungs rank the final score better here"
    dist = subset_top_k(table, table.complete, 20, draws=200)
    assert sum(dist.values()) == pytest.approx(1.0) and set(dist) <= set(range(6))
    eff = data_efficiency(table, table.complete)
    assert [r["size"] for r in eff] == sorted(synthetic_spec()["search_space"]["train_size"]["choices"])
    assert saturation_size(eff, 0.01) in [r["size"] for r in eff]
    assert saturation_size([{"size": 1, "best_val": 0.5}, {"size": 2, "best_val": 0.9}], 0.01) == 2
