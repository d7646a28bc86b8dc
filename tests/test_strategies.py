"""The strategy benchmark's accounting (benchmarks/strategies.py): a paused trial's result counts when it really
ended, peers that run out of new configurations end with their incumbent, the top-5 count, where the compute
went; the lowest-fidelity screening baseline (Egele et al.); and the pausing strategies (ASHA, the
multi-fidelity TPE, freeze-thaw) through the real server on the SYNTHETIC table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.strategies import (
    SCREEN_TOP_K,
    STRATEGIES,
    BenchContext,
    Evaluation,
    Run,
    _NearestCache,
    _PeerLedger,
    evaluations_from_ledger,
    local_server,
    run_benchmark,
    spend_rows,
    summarise,
    top_configurations,
)
from tunefleet.workers.replay import ReplayTable

TINY = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "curves-synthetic-tiny.jsonl"


@pytest.fixture(scope="module")
def table() -> ReplayTable:
    return ReplayTable.load(TINY)


def _trial(trial_id: int, value: float | None) -> dict:
    return {"id": trial_id, "state": "COMPLETE" if value is not None else "RUNNING", "value": value,
            "params": {"x": trial_id}, "test_metrics": {"accuracy": value} if value is not None else {}}


def test_a_paused_trial_counts_where_its_last_stretch_ended_not_at_its_number(table: ReplayTable) -> None:
    ledger = [  # trial 1 paused at 20%, trial 2 ran to the end, then trial 1 was resumed and finished
        {"trial_id": 1, "steps": 2, "state": "PAUSED"},
        {"trial_id": 2, "steps": 10, "state": "COMPLETE"},
        {"trial_id": 1, "steps": 8, "state": "COMPLETE"},
    ]
    evaluations = evaluations_from_ledger(ledger, [_trial(1, 0.9), _trial(2, 0.5)], table)
    assert [(e.steps_end, e.final) for e in evaluations] == [(2, None), (12, 0.5), (20, 0.9)]
    with pytest.raises(RuntimeError, match="server holds RUNNING"):
        evaluations_from_ledger(ledger, [_trial(1, None), _trial(2, 0.5)], table)


def test_a_peer_that_only_reproposes_what_it_trained_ends_with_its_incumbent(table: ReplayTable) -> None:
    ledger = _PeerLedger(table, budget_steps=1e9)
    params = dict(table.records[0].params)
    ledger.evaluate(params, 100)
    for _ in range(_PeerLedger.MAX_FREE_PROPOSALS - 1):
        ledger.evaluate(params, 100)
        ledger.evaluate(params, 20)  # lower fidelity of a trained configuration: free too
    assert ledger.done and len(ledger.evaluations) == 1
    assert ledger.evaluations[0].final == table.final(table.records[0])


def test_smac_ends_when_its_space_is_exhausted_and_keeps_its_incumbent(table: ReplayTable, tmp_path: Path) -> None:
    pytest.importorskip("smac")
    from benchmarks.strategies import BenchContext, _smac_run

    spec = dict(table.spec, search_space={"method": table.space["method"]})  # two configurations in all
    small = ReplayTable(table.records, spec, table.meta)
    evaluations = _smac_run(small, 0, 100 * small.mean_total_steps(), BenchContext(None, tmp_path))
    assert evaluations[-1].steps_end < 100 * small.mean_total_steps(), "it ran out of configurations first"
    assert any(e.final is not None for e in evaluations)


def test_top_configurations_include_ties_and_each_run_counts_those_it_trained_to_the_end(table: ReplayTable) -> None:
    top = top_configurations(table, k=5)
    assert len(top) >= 5
    best = [r for r in table.complete if r.index in top]
    others = [r for r in table.complete if r.index not in top]
    assert min(map(table.final, best)) > max(map(table.final, others))
    found, missed = best[0], best[1]
    steps = 6 * table.mean_total_steps()
    run = Run("x", 0, steps, [Evaluation(1.0, table.final(found), 0.5, dict(found.params)),
                              Evaluation(2.0, None, None, dict(missed.params)),  # paused, never finished
                              Evaluation(steps + 1, table.final(missed), 0.5, dict(missed.params))])  # too late
    (row,) = summarise([run], table)
    assert row["top"][0] == 1 and row["top_size"] == len(top)
    assert row["trials"] == 2 and row["full_trials"] == 2


@pytest.mark.parametrize("strategy", ["tpe-asha", "mf-tpe-asha", "mf-tpe-hyperband", "tpe-freeze-thaw",
                                      "mf-gp-p-freeze-thaw"])
def test_pausing_and_multi_fidelity_strategies_run_through_the_server(table: ReplayTable, strategy: str) -> None:
    budget_trials = 15.0  # enough for ASHA's cut to move and promote a paused trial
    budget = budget_trials * table.mean_total_steps()
    (run,) = run_benchmark(table, [strategy], [0], budget_trials, progress=lambda _: None)
    steps = [e.steps_end for e in run.evaluations]
    assert steps == sorted(steps) and budget <= steps[-1], "the ledger's timeline spends the whole budget"
    assert any(e.final is not None for e in run.evaluations)
    if strategy.endswith(("asha", "freeze-thaw")):
        configurations = {tuple(sorted(e.params.items())) for e in run.evaluations}
        assert len(run.evaluations) > len(configurations), "some trial paused and was resumed later"
    assert all(e.final is None or e.test is not None for e in run.evaluations)


def test_a_warm_started_strategy_first_runs_the_other_studys_best_then_its_own_search(table: ReplayTable,
                                                                                      tmp_path: Path) -> None:
    from tunefleet.service.client import Client

    budget = 4 * table.mean_total_steps()
    with local_server() as url, Client(url) as client:
        with pytest.raises(ValueError, match="--warm-from"):
            STRATEGIES["tpe-freeze-thaw-warm"].run(table, 0, budget, BenchContext(client, tmp_path))
        evaluations = STRATEGIES["tpe-freeze-thaw-warm"].run(table, 0, budget, BenchContext(client, tmp_path, table))
        studies = {s["name"]: s for s in client.list_studies(limit=200)["items"]}
        [source] = [s for name, s in studies.items() if name.startswith("warm-source-")]
        [target] = [s for name, s in studies.items() if name.startswith("bench-")]
        source_best = sorted((t for t in client.list_trials(source["id"], limit=1000)["items"]
                              if t["state"] == "COMPLETE"), key=lambda t: -t["value"])[:3]
        k = len(source_best)  # the source ran on its own small budget: it may have completed fewer than 3
        first = sorted(client.list_trials(target["id"], limit=1000)["items"], key=lambda t: t["number"])[:k + 1]
    assert k >= 1
    assert [t["user_attrs"].get("warm_start_from") for t in first] == [source["name"]] * k + [None]
    first = first[:k]
    assert [t["params"] for t in first] == [t["params"] for t in source_best], "the other study's best 3, best first"
    assert evaluations and evaluations[-1].steps_end <= budget + table.mean_total_steps() * 2, "its own budget"


@pytest.mark.parametrize("name", ["screen-top3", "screen10-top3"])
def test_screening_baseline_finishes_the_top_k_of_its_screen_within_the_budget(table: ReplayTable, name: str,
                                                                                tmp_path: Path) -> None:
    budget = 6 * table.mean_total_steps()
    evaluations = STRATEGIES[name].run(table, 0, budget, BenchContext(None, tmp_path))
    screens, finals = evaluations[:-SCREEN_TOP_K], evaluations[-SCREEN_TOP_K:]
    assert all(e.final is None for e in screens) and all(e.final is not None for e in finals)
    assert len(screens) > 2 * SCREEN_TOP_K and evaluations[-1].steps_end <= budget, "as many as the budget allows"
    pct = 20.0 if name == "screen-top3" else 10.0
    nearest = _NearestCache(table)
    records = {r.index: r for r in table.records}
    at_screen = sorted((records[nearest(e.params)].value_at(pct) for e in screens), reverse=True)
    kept = [records[nearest(e.params)] for e in finals]
    assert sorted((r.value_at(pct) for r in kept), reverse=True) == at_screen[:SCREEN_TOP_K]
    for before, e, record in zip([evaluations[-SCREEN_TOP_K - 1], *finals], finals, kept, strict=False):
        assert e.steps_end - before.steps_end == record.total_steps - record.steps_at(pct), "charged the rest only"


def test_the_clairvoyant_bound_screens_everything_and_finishes_exactly_each_new_best(table: ReplayTable,
                                                                                     tmp_path: Path) -> None:
    budget = 6 * table.mean_total_steps()
    evaluations = STRATEGIES["clairvoyant-random"].run(table, 0, budget, BenchContext(None, tmp_path))
    nearest = _NearestCache(table)
    records = {r.index: r for r in table.records}
    best, screened = float("-inf"), 0
    for i, e in enumerate(evaluations):
        record = records[nearest(e.params)]
        if e.final is None:
            screened += 1
            assert e.steps_end - (evaluations[i - 1].steps_end if i else 0) == record.steps_at(20.0)
            final = table.final(record)
            follows = evaluations[i + 1] if i + 1 < len(evaluations) else None
            finished = follows is not None and follows.final is not None and follows.params == e.params
            assert finished == (final > best) or follows is None, "trained on exactly when it beats the best"
        else:
            assert e.final == table.final(record) > best, "only a new best is trained to 100%"
            assert e.steps_end - evaluations[i - 1].steps_end == record.total_steps - record.steps_at(20.0)
            best = e.final
    assert screened > 6 and best > float("-inf")


def test_spend_rows_split_the_compute_and_time_the_first_configuration_that_reaches_the_target(
        table: ReplayTable) -> None:
    best = max(table.complete, key=table.final)
    worst = min(table.complete, key=table.final)
    steps = 4 * table.mean_total_steps()
    first = best.steps_at(20)
    run = Run("x", 0, steps, [
        Evaluation(worst.total_steps, table.final(worst), 0.1, dict(worst.params)),  # from scratch to 100%
        Evaluation(worst.total_steps + first, None, None, dict(best.params)),  # paused at 20%
        Evaluation(worst.total_steps + best.total_steps, table.final(best), 0.9, dict(best.params)),  # resumed
    ])
    (row,) = spend_rows([run], table, target=table.final(best))
    assert row["scratch"] == pytest.approx(worst.total_steps / steps)
    assert row["first"] == pytest.approx(first / steps)
    assert row["resumed"] == pytest.approx((best.total_steps - first) / steps) and row["middle"] == 0
    assert row["below"] == pytest.approx(worst.total_steps / steps)
    assert row["winner_started"] == pytest.approx(worst.total_steps / steps)
    assert row["winner_finished"] == pytest.approx((worst.total_steps + best.total_steps) / steps)
    assert row["configs_before"] == 1
    assert row["hits_early"] == 0.5 and math.isnan(row["hits_later"]), "1 of 2 new ones reach it; no later ones"


def test_freeze_thaw_calibration_reports_both_models(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.freeze_thaw_calibration import main

    assert main(["--table", str(TINY), "--repeats", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    conversion = [line for line in lines if line.startswith(("| 20%", "| 60%"))]
    assert len(conversion) == 10 and len(lines) == 2 + 10 + 4
    for line in conversion:
        c50, c90, tail = (float(x) for x in line.strip("| ").split(" | ")[2:])
        assert 0 <= c50 <= c90 <= 1 and 0 <= tail <= 1
