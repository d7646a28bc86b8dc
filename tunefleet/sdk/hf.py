"""`TunefleetCallback`: an existing Hugging Face `Trainer` script under `tunefleet agent` in two added lines.

    from tunefleet.sdk.hf import TunefleetCallback
    trainer = Trainer(..., callbacks=[TunefleetCallback()])

Each evaluation is reported (the study's objective, e.g. `eval_loss` or `eval_accuracy`, with the other
evaluation metrics and `samples`), training stops when the answer is prune or pause, and on pause the
Trainer's checkpoint is saved into `tunefleet.sdk.checkpoint_dir()`. To resume paused trials from it, train
with `trainer.train(resume_from_checkpoint=sdk.resume_dir())` (a third line; without it they restart).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunefleet import sdk

__all__ = ["TunefleetCallback"]


class TunefleetCallback(TrainerCallback):
    """Reports each evaluation to the agent and stops training on prune or pause (see the module docstring).

    `metric`: the evaluation metric to report as the value (default: the study's objective). Only the main
    process reports (`state.is_world_process_zero`)."""

    def __init__(self, metric: str | None = None):
        self.metric = metric
        self._pausing = False

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not metrics:
            return
        metric = self.metric or sdk.objective() or "eval_loss"
        if metric not in metrics:
            raise KeyError(f"the evaluation has no metric {metric!r} (it has {', '.join(sorted(metrics))}): name "
                           "one of these as the study's objective, or pass TunefleetCallback(metric=...)")
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != metric}
        samples = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * max(
            args.world_size, 1)
        action = sdk.report(state.global_step, float(metrics[metric]), max_step=state.max_steps or None,
                            samples=samples, **numbers)
        if action == "pause":
            self._pausing = True
            control.should_save = True  # the Trainer saves a checkpoint right after this evaluation
        if action != "continue":
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._pausing and state.is_world_process_zero:
            saved = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            shutil.copytree(saved, sdk.checkpoint_dir(), dirs_exist_ok=True)
