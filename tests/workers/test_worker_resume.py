"""Pause at a rung and resume from the checkpoint: the resumed trial equals an uninterrupted one."""

from __future__ import annotations

import json

import pytest

from tests.workers.fakes import Reports
from tunefleet.workers.training import PROGRESS_FILE, run_trial

RUNGS = [20, 60, 100]


@pytest.mark.parametrize(("method", "lr"), [("lora", 1e-2), ("full", 1e-3)])
def test_a_paused_and_resumed_trial_equals_an_uninterrupted_one(method, lr, make_spec, tmp_path, cache):
    # 96 examples / batch 16 = 6 steps per epoch, 3 epochs = 18 steps: the pause at 20% is mid-epoch (step 4),
    # so resuming must also restore the position in the data, not only weights and optimizer.
    spec = make_spec(sizes=(96, 32, 32), fixed={"method": method, "num_epochs": 3, "learning_rate": lr,
                                                "warmup_ratio": 0.1, "weight_decay": 0.01})
    whole = Reports()
    uninterrupted = run_trial(spec, {}, RUNGS, whole, workdir=tmp_path / "whole", model_cache=cache)

    first = Reports(pause_at=20)
    paused = run_trial(spec, {}, RUNGS, first, workdir=tmp_path / "a", model_cache=cache)
    assert paused.paused_at == 20 and not paused.pruned and paused.test_metrics == {}
    assert paused.checkpoint_dir is not None and (paused.checkpoint_dir / PROGRESS_FILE).is_file()
    assert first.percents == [20]

    rest = Reports()
    resumed = run_trial(spec, {}, RUNGS, rest, workdir=tmp_path / "b", model_cache=cache,
                        resume_from=paused.checkpoint_dir)
    assert rest.percents == [60, 100], "a resumed trial reports only the rungs after its checkpoint"
    # Same rungs, same values and same validation losses (a continuous metric: accuracy alone moves in steps).
    assert [c[0] for c in first.calls + rest.calls] == whole.percents
    for (_, value, metrics), (_, expected, expected_metrics) in zip(first.calls + rest.calls, whole.calls,
                                                                    strict=True):
        assert value == pytest.approx(expected, abs=1e-6)
        assert metrics == pytest.approx(expected_metrics, abs=1e-6)
    assert whole.calls[0][2]["loss"] != pytest.approx(whole.calls[-1][2]["loss"], abs=1e-4), "it learns"
    assert resumed.value == pytest.approx(uninterrupted.value, abs=1e-6)
    assert resumed.test_metrics == pytest.approx(uninterrupted.test_metrics, abs=1e-6)
    # The training log of the resumed run ends with the same losses as the uninterrupted one.
    losses = [e["loss"] for e in json.loads((resumed.artifact_dir / "trainer_log.json").read_text()) if "loss" in e]
    whole_losses = [e["loss"] for e in json.loads((uninterrupted.artifact_dir / "trainer_log.json").read_text())
                    if "loss" in e]
    assert losses[-5:] == pytest.approx(whole_losses[-5:], abs=1e-5)
    assert resumed.extra["steps_done"] == uninterrupted.extra["steps_done"] == 18
    assert resumed.extra["samples_trained"] == pytest.approx(uninterrupted.extra["samples_trained"])
