"""Run one trial: data → model + method → HF Trainer, evaluating and reporting at each rung.

`run_trial` is what the pull loop calls (workers/loop.py); it never talks HTTP. The server's rungs
are percents of the trial's training budget (its total optimizer steps); when progress reaches a
rung the validation split is evaluated and `report(percent, objective, metrics)` is called. A "prune"
answer stops training at once; a "pause" answer stops it after the Trainer saved a checkpoint (weights or
adapter, optimizer, scheduler, RNG states, the position in the data), from which `resume_from` continues
exactly where it stopped. At the end the validation metrics of the 100% rung are the trial's result and
the test split is evaluated once — test never feeds pruning or selection.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import math
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from tunefleet.service.spec import COST_METRICS, SCORER_METRIC, TRAINING_DEFAULTS, SpecError, objectives_of
from tunefleet.workers.data import Splits, load_splits
from tunefleet.workers.errors import InvalidConfig, NonFiniteLoss, OutOfMemory, TrialFailed, TrialInterrupted
from tunefleet.workers.evaluation import load_scorer
from tunefleet.workers.methods import apply_method, count_parameters, save_model
from tunefleet.workers.model_cache import ModelCache
from tunefleet.workers.tasks import Prepared, Task, get_task

__all__ = ["DEFAULTS", "TrialOutcome", "resolve_config", "resolve_precision", "run_trial"]

log = logging.getLogger(__name__)

Report = Callable[[int, float, dict[str, float]], str]  # -> "continue", "prune" or "pause"
# Counters of a trial's earlier segments, written into each checkpoint so a resumed trial reports totals.
PROGRESS_FILE = "tunefleet_progress.json"

# Values used for every catalog parameter a study neither fixes nor searches; the catalog
# (tunefleet.service.spec) keeps each parameter's kind and default side by side.
DEFAULTS: dict[str, Any] = TRAINING_DEFAULTS


@dataclass
class TrialOutcome:
    """What a finished (or pruned) trial produced; the loop sends it to `complete` (or acknowledges a prune)."""

    pruned: bool  # True if report() answered "prune" at some rung
    value: float | None  # single objective on validation at the end (None if stopped early or multi-objective)
    values: list[float] | None  # multi-objective: one per spec objective, in spec order (else None)
    validation_metrics: dict[str, float]  # at the end; for a pruned or paused trial, at its last rung
    test_metrics: dict[str, float]  # empty when stopped early: the test split is never evaluated early
    extra: dict[str, float]
    artifact_dir: Path | None  # adapter or model (safetensors) + trainer_log.json + data_splits.json
    data_splits: dict[str, Any] = field(default_factory=dict)  # source, seed, sizes of the splits
    paused_at: int | None = None  # the rung report() answered "pause" at
    checkpoint_dir: Path | None = None  # the Trainer checkpoint saved there (resume_from continues from it)


def resolve_config(spec: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The effective training config `{**DEFAULTS, **spec['fixed'], **params}`; raises InvalidConfig."""
    unknown = sorted(set(spec.get("fixed") or {}).union(params) - set(DEFAULTS))
    if unknown:
        raise InvalidConfig(f"unknown training parameters {unknown}; known: {', '.join(DEFAULTS)}")
    config = {**DEFAULTS, **(spec.get("fixed") or {}), **params}
    if config["seed"] is None:
        config["seed"] = int(spec.get("seed", 0))
    if config["lora_alpha"] is None:
        config["lora_alpha"] = 2 * int(config["lora_r"])
    if not 0 <= float(config["warmup_ratio"]) < 1:
        raise InvalidConfig(f"warmup_ratio={config['warmup_ratio']} must be in [0, 1)")
    return config


def run_trial(spec: dict[str, Any], params: dict[str, Any], rungs: list[int], report: Report, *,
              device: str = "cpu", workdir: Path, model_cache: ModelCache | None = None,
              should_stop: Callable[[], bool] = lambda: False, resume_from: Path | None = None,
              inputs: Mapping[str, Any] | None = None) -> TrialOutcome:
    """Train and evaluate one trial of `spec` with `params`, reporting at each rung percent.

    `report(percent, objective_value, metrics)` answers "continue", "prune" or "pause" (checkpoint and stop).
    `resume_from` is a checkpoint an earlier "pause" of the same trial saved: training continues from its
    step, and only later rungs are reported. `inputs` says what the worker fetched for the spec's local paths
    (`{location: {uri, sha256}}`, workers/inputs.py): the data-splits record keeps it. `should_stop()` is polled after
    every optimizer step and must be cheap (read a flag). `device` is "cpu" or "cuda[:N]"
    (CUDA_VISIBLE_DEVICES is the simplest way to give a worker one GPU).
    Raises TrialInterrupted when should_stop() turns True, and TrialFailed subclasses: InvalidConfig,
    DataError, ModelLoadError, OutOfMemory, NonFiniteLoss (none retryable).
    """
    started = time.perf_counter()
    config = resolve_config(spec, params)
    task = get_task(spec["task"])
    objectives = _objectives(spec)
    cache = model_cache if model_cache is not None else ModelCache(max_models=1)
    _use_device(device)
    _quantization(config, device)  # refuse 4-bit loading where it cannot run before reading any data
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    set_seed(config["seed"])
    splits, tokenizer, label_names, prepared = _prepare_data(spec, config, task, cache)
    if inputs:
        splits.record["inputs"] = dict(inputs)
    loaded = cache.model(spec["model"], task, label_names, seed=config["seed"],
                         quantization=_quantization(config, device))
    if getattr(loaded.model.config, "pad_token_id", None) is None:
        # A decoder's classification head reads the last token that is not padding, so it must know the pad id.
        loaded.model.config.pad_token_id = tokenizer.pad_token_id
    if should_stop():
        raise TrialInterrupted("asked to stop before training started")
    # Loading a model draws random numbers and a cached copy does not: seed again, so an adapter's initial
    # weights are the same in a worker's first trial as in its later ones.
    set_seed(config["seed"])
    model = apply_method(loaded.model, config, task)
    trainable, total_params = count_parameters(model)
    log.info("trial: task=%s method=%s trainable=%d/%d params; splits %s", task.name, config["method"],
             trainable, total_params, splits.record["sizes"])

    metric_names = (*task.metrics, SCORER_METRIC) if prepared.scorer else task.metrics
    callback = _RungCallback(rungs, report, objectives, metric_names, should_stop)
    earlier = _earlier_progress(resume_from)
    trainer = None
    try:
        with _device_errors(config, device):  # moving the model to the device can run out of memory too
            trainer = _make_trainer(model, tokenizer, task, prepared, label_names, config, device, workdir, callback)
            train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            callback.raise_if_stopped()
            if callback.pruned_at is None and callback.paused_at is None:
                if callback.last_step != trainer.state.global_step:  # rungs ended before 100%: evaluate now
                    trainer.evaluate()
                # Trainer.evaluate is annotated with torch's Dataset class but takes any sized, indexable split.
                test = trainer.evaluate(prepared.test, metric_key_prefix="test")  # type: ignore[arg-type]
        extra = _extra(train_output.metrics, trainer, callback, loaded, device, started, trainable, total_params,
                       earlier)
        if callback.pruned_at is not None:
            log.info("pruned at %d%%", callback.pruned_at)
            return TrialOutcome(True, None, None, callback.last_metrics, {}, extra, None, splits.record)
        if callback.paused_at is not None:
            checkpoint = _paused_checkpoint(trainer, extra)
            log.info("paused at %d%%: checkpoint %s", callback.paused_at, checkpoint)
            return TrialOutcome(False, None, None, callback.last_metrics, {}, extra, None, splits.record,
                                paused_at=callback.paused_at, checkpoint_dir=checkpoint)
        # Under DDP (tunefleet.workers.distributed) rank 0 saves; the others' outcomes are not used.
        artifact = _save_artifact(workdir, model, tokenizer, trainer, splits.record) \
            if trainer.is_world_process_zero() else None
        extra["gpu_hours"] = _gpu_hours(earlier, started, trainer, device)
        # The test-set size lets the fidelity report put a confidence interval on tuned vs baseline.
        test_metrics = {**_strip(test, "test", metric_names), "n_examples": len(prepared.test)}
        return _completed(objectives, callback.last_metrics, test_metrics, extra, artifact, splits.record)
    finally:
        # Release device memory before the next trial, whatever happened.
        del trainer, model, loaded
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _prepare_data(spec: Mapping[str, Any], config: Mapping[str, Any], task: Task, cache: ModelCache
                  ) -> tuple[Splits, Any, list[str] | None, Prepared]:
    """Splits, the (cached) tokenizer, the label vocabulary and the tokenized splits."""
    data = _data_section(spec)
    splits = load_splits(data, required=task.required_fields(data), train_size=config["train_size"])
    tokenizer = cache.tokenizer(spec.get("tokenizer") or spec["model"])
    task.prepare_tokenizer(tokenizer)
    label_names = task.label_names(splits, data)
    prepared = task.prepare(splits, tokenizer, data, label_names, int(config["max_seq_length"]))
    _apply_evaluation(spec.get("evaluation") or {}, prepared)
    return splits, tokenizer, label_names, prepared


def _apply_evaluation(evaluation: Mapping[str, Any], prepared: Prepared) -> None:
    """The spec's `evaluation` section (task sft): the user's scorer, imported here, and the generation length."""
    if evaluation.get("max_new_tokens"):
        prepared.max_new_tokens = int(evaluation["max_new_tokens"])
    if evaluation.get("scorer"):
        try:
            prepared.scorer = load_scorer(str(evaluation["scorer"]))
        except ValueError as exc:
            raise InvalidConfig(f"evaluation.scorer: {exc}") from exc


def _completed(objectives: list[tuple[str, str]], validation: dict[str, float], test: dict[str, float],
               extra: dict[str, float], artifact: Path | None, record: dict[str, Any]) -> TrialOutcome:
    # An objective is a task metric on validation or a cost metric the trial measured (service.spec.COST_METRICS).
    measured = {**{k: extra[k] for k in COST_METRICS if k in extra}, **validation}
    values = [measured[metric] for metric, _ in objectives]
    multi = len(values) > 1
    return TrialOutcome(False, None if multi else values[0], values if multi else None, validation,
                        test, extra, artifact, record)


def _data_section(spec: Mapping[str, Any]) -> dict[str, Any]:
    # The spec's own schema fills defaults, so a hand-written dict behaves like a validated spec.
    from pydantic import ValidationError

    from tunefleet.service.spec import DataSpec

    try:
        return DataSpec.model_validate(spec["data"]).model_dump()
    except (ValidationError, KeyError) as exc:
        raise InvalidConfig(f"the spec's data section is invalid: {exc}") from exc


def _objectives(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The spec's (metric, direction) pairs; raises InvalidConfig when its objective is malformed."""
    try:
        return objectives_of(spec)
    except SpecError as exc:
        raise InvalidConfig(f"the spec's objective is invalid: {exc}") from exc


def _use_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise InvalidConfig(f"device {device!r} is not available; use 'cpu' or 'cuda[:N]' on a machine with a GPU")
    if ":" in device:
        # Trainer places the model on the current CUDA device.
        torch.cuda.set_device(int(device.split(":", 1)[1]))


def _quantization(config: Mapping[str, Any], device: str) -> Any:
    """The 4-bit (NF4) loading config of method qlora, None for other methods; raises InvalidConfig where
    bitsandbytes cannot run: it quantizes on CUDA only."""
    if config["method"] != "qlora":
        return None
    if not device.startswith("cuda"):
        raise InvalidConfig(f"method qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA "
                            f"GPU, and this worker runs on {device}: use method lora here, or run the study's "
                            "workers with --device cuda")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidConfig("method qlora needs bitsandbytes on the worker: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def resolve_precision(config: Mapping[str, Any], device: str) -> str:
    """The format to train in, fp32, bf16 or fp16, with "auto" resolved for the device; raises InvalidConfig."""
    choice = config["precision"]
    cuda = device.startswith("cuda")
    if choice == "auto":
        choice = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if choice == "fp16" and not cuda:
        raise InvalidConfig("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if choice == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise InvalidConfig("this GPU does not support bf16; use precision fp16 or auto")
    if choice not in ("fp32", "bf16", "fp16"):
        raise InvalidConfig(f"unknown precision {choice!r}; use auto, fp32, bf16 or fp16")
    return str(choice)


def training_arguments(config: Mapping[str, Any], device: str, output_dir: Path) -> TrainingArguments:
    """TrainingArguments for `config` (transformers 5 names); no checkpoints, no progress bars."""
    precision = resolve_precision(config, device)
    try:
        return TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=int(config["per_device_batch_size"]),
            per_device_eval_batch_size=int(config["eval_batch_size"]),
            gradient_accumulation_steps=int(config["gradient_accumulation_steps"]),
            learning_rate=float(config["learning_rate"]),
            weight_decay=float(config["weight_decay"]),
            warmup_steps=float(config["warmup_ratio"]),  # a float below 1 is a ratio of the total steps
            lr_scheduler_type=config["lr_scheduler"],
            optim=config["optimizer"],
            adam_beta2=float(config["adam_beta2"]),
            max_grad_norm=float(config["max_grad_norm"]),
            num_train_epochs=float(config["num_epochs"]),
            max_steps=int(config["max_steps"]) if config["max_steps"] else -1,
            label_smoothing_factor=float(config["label_smoothing"]),
            seed=int(config["seed"]),
            data_seed=int(config["seed"]),
            use_cpu=device == "cpu",
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            eval_strategy="no",  # the rung callback decides when to evaluate
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            logging_nan_inf_filter=False,  # the filter would hide the NaN we stop on
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
    except ValueError as exc:  # unknown optimizer / scheduler names and inconsistent values
        raise InvalidConfig(f"invalid training parameters: {exc}") from exc


def _make_trainer(model: Any, tokenizer: Any, task: Task, prepared: Prepared, label_names: list[str] | None,
                  config: Mapping[str, Any], device: str, workdir: Path, callback: _RungCallback) -> _TaskTrainer:
    compute_metrics = task.compute_metrics(label_names)
    trainer = _TaskTrainer(
        model=model,
        args=training_arguments(config, device, Path(workdir) / "trainer"),
        train_dataset=prepared.train,
        eval_dataset=prepared.validation,
        data_collator=prepared.collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=_argmax if compute_metrics else None,
        callbacks=[callback],
        task=task,
        prepared=prepared,
    )
    trainer.remove_callback(PrinterCallback)  # it print()s every log; the callback logs instead
    return trainer


def _argmax(logits: Any, labels: Any) -> Any:
    # Keep argmax ids, not (N, L, C) logits, across evaluation batches.
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


class _TaskTrainer(Trainer):
    """A Trainer that counts trained examples and adds a task's generation metrics to each evaluation."""

    def __init__(self, *args: Any, task: Task, prepared: Prepared, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.task, self.prepared, self.samples_trained = task, prepared, 0

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.samples_trained += len(inputs["input_ids"])
        return super().training_step(model, inputs, *args, **kwargs)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        assert output.metrics is not None  # evaluation_loop always fills them (the loss at least)
        split = "test" if metric_key_prefix == "test" else "validation"
        extra = self.task.generation_metrics(self.model, self.processing_class, self.prepared, split,
                                             self.args.per_device_eval_batch_size)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        return output


def _strip(metrics: Mapping[str, Any], prefix: str, names: tuple[str, ...]) -> dict[str, float]:
    """The task's metrics from a Trainer metrics dict, without the `eval_` / `test_` prefix."""
    return {n: float(metrics[f"{prefix}_{n}"]) for n in names if f"{prefix}_{n}" in metrics}


def _rung_steps(rungs: list[int], total_steps: int) -> dict[int, list[int]]:
    """Optimizer step at which each rung percent is reached (`ceil(total * pct / 100)`), grouped by step."""
    due: dict[int, list[int]] = {}
    for pct in sorted(set(rungs)):
        step = min(total_steps, max(1, math.ceil(total_steps * pct / 100)))
        due.setdefault(step, []).append(pct)
    return due


def _rung_metric(objectives: list[tuple[str, str]], metric_names: tuple[str, ...]) -> str:
    """The metric reported at rungs: the first objective an evaluation measures, else the loss (a cost metric is
    only known at the end; studies whose first objective is one are multi-objective or unpruned, so the
    server uses rung values for neither)."""
    return next((metric for metric, _ in objectives if metric in metric_names), "loss")


class _RungCallback(TrainerCallback):
    """Evaluates at rung steps, reports, and stops training on prune, stop, or a non-finite loss."""

    def __init__(self, rungs: list[int], report: Report, objectives: list[tuple[str, str]],
                 metric_names: tuple[str, ...], should_stop: Callable[[], bool]):
        self.rungs, self.report, self.objective = rungs, report, _rung_metric(objectives, metric_names)
        self.metric_names, self.should_stop = metric_names, should_stop
        self.due: dict[int, list[int]] = {}
        self.eval_steps: set[int] = set()
        self.evaluated: set[int] = set()
        self.last_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.pruned_at: int | None = None
        self.paused_at: int | None = None
        self.interrupted = False
        self.non_finite: tuple[int, float] | None = None
        self.eval_seconds = 0.0
        self._eval_started: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # state.max_steps is the Trainer's own budget (max_steps, or epochs × update steps per epoch).
        self.due = _rung_steps(self.rungs, state.max_steps)
        self.eval_steps = set(self.due) | {state.max_steps}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.should_stop():
            self.interrupted = True
            control.should_training_stop = True
        elif state.global_step in self.eval_steps:
            control.should_evaluate = True
            self._eval_started = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            self.non_finite = (state.global_step, loss)
            control.should_training_stop = True
            control.should_evaluate = False
        if loss is not None:
            log.info("step %d/%d loss %.4f lr %.3g", state.global_step, state.max_steps, loss,
                     logs.get("learning_rate", float("nan")))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        metrics = metrics or {}
        # Test evaluations and the repeat that trainer.evaluate() fires after train() are not rungs.
        if not any(k.startswith("eval_") for k in metrics) or state.global_step in self.evaluated:
            return
        self.evaluated.add(state.global_step)
        if self._eval_started is not None:
            self.eval_seconds += time.perf_counter() - self._eval_started
            self._eval_started = None
        self.last_step, self.last_metrics = state.global_step, _strip(metrics, "eval", self.metric_names)
        log.info("evaluation at step %d: %s", state.global_step, self.last_metrics)
        for pct in self.due.get(state.global_step, []):
            action = self.report(pct, self.last_metrics[self.objective], dict(self.last_metrics))
            if action == "prune":
                self.pruned_at = pct
                control.should_training_stop = True
                break
            if action == "pause":  # the Trainer saves a checkpoint right after this evaluation, then stops
                self.paused_at = pct
                control.should_save = True
                control.should_training_stop = True
                break

    def raise_if_stopped(self) -> None:
        """After train(): turn a non-finite loss or a stop request into its exception."""
        if self.non_finite is not None:
            step, loss = self.non_finite
            raise NonFiniteLoss(f"the training loss became {loss} at step {step}: training diverged. Lower "
                                "learning_rate (or its search range), add warmup_ratio, or keep max_grad_norm set")
        if self.interrupted:
            raise TrialInterrupted("training stopped: the worker was asked to stop")


@contextmanager
def _device_errors(config: Mapping[str, Any], device: str) -> Iterator[None]:
    """Turn out-of-memory errors into OutOfMemory with what to change."""
    try:
        yield
    except TrialFailed:
        raise
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError too
        if not (isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()):
            raise
        raise OutOfMemory(
            f"{device} ran out of memory (method {config['method']}, per_device_batch_size "
            f"{config['per_device_batch_size']}, max_seq_length {config['max_seq_length']}): lower "
            "per_device_batch_size (raise gradient_accumulation_steps to keep the effective batch), lower "
            f"max_seq_length, or use method lora. ({str(exc).splitlines()[0][:200]})") from exc


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    # On CPU: the process's peak resident set (Linux reports KiB), across all trials so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _extra(train_metrics: Mapping[str, float], trainer: Any, callback: _RungCallback, loaded: Any, device: str,
           started: float, trainable: int, total_params: int, earlier: Mapping[str, float]) -> dict[str, float]:
    """The trial's counters: this segment's plus, for a resumed trial, its earlier segments' (`earlier`)."""
    train_seconds = earlier.get("train_seconds", 0.0) + float(train_metrics.get("train_runtime", 0.0))
    eval_seconds = earlier.get("eval_seconds", 0.0) + callback.eval_seconds
    # Each DDP rank trains its own share of every batch.
    samples = earlier.get("samples_trained", 0.0) + trainer.samples_trained * trainer.args.world_size
    # Rung evaluations run inside train(); throughput counts training time only.
    pure_train = max(train_seconds - eval_seconds, 1e-9)
    return {
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        # device-hours of the whole trial (loading and evaluation included)
        "gpu_hours": _gpu_hours(earlier, started, trainer, device),
        "world_size": float(trainer.args.world_size),  # devices (DDP ranks) the trial trained on
        "peak_memory_mb": _peak_memory_mb(device),
        "samples_trained": samples,
        "samples_per_second": samples / pure_train,
        "total_steps": float(trainer.state.max_steps),
        "steps_done": float(trainer.state.global_step),
        "model_load_seconds": loaded.load_seconds,
        "base_model_cached": float(loaded.cached),
        "trainable_params": float(trainable),
        "total_params": float(total_params),
    }


def _gpu_hours(earlier: Mapping[str, float], started: float, trainer: Any, device: str) -> float:
    """GPU-hours of the whole trial: this segment's wall time on each of its devices (DDP ranks), plus earlier
    segments'. 0 on CPU, where no accelerator is held (train_seconds still measures the time)."""
    if not device.startswith("cuda"):
        return earlier.get("gpu_hours", 0.0)
    return earlier.get("gpu_hours", 0.0) + (time.perf_counter() - started) / 3600 * trainer.args.world_size


def _earlier_progress(checkpoint: Path | None) -> dict[str, float]:
    """The counters of a resumed trial's earlier segments, saved in its checkpoint; empty for a fresh start."""
    if checkpoint is None or not (checkpoint / PROGRESS_FILE).is_file():
        return {}
    return {k: float(v) for k, v in json.loads((checkpoint / PROGRESS_FILE).read_text()).items()}


def _paused_checkpoint(trainer: Any, extra: Mapping[str, float]) -> Path:
    """The checkpoint the Trainer saved at the pause, with the trial's counters so far added to it."""
    folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not folder.is_dir():
        raise TrialFailed(f"the Trainer saved no checkpoint at step {trainer.state.global_step} ({folder})",
                          retryable=True)
    if trainer.is_world_process_zero():  # the one writer of the checkpoint's files (DDP ranks share the folder)
        progress = {k: extra[k] for k in ("train_seconds", "eval_seconds", "gpu_hours", "samples_trained")}
        (folder / PROGRESS_FILE).write_text(json.dumps(progress))
    return folder


def _save_artifact(workdir: Path, model: Any, tokenizer: Any, trainer: Any, record: Mapping[str, Any]) -> Path:
    """Write the adapter (PEFT) or model, its tokenizer, the Trainer log and the split record."""
    out = Path(workdir) / "artifact"
    if out.exists():  # a retried trial in the same workdir starts clean
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_model(model, out)
    tokenizer.save_pretrained(out)
    (out / "trainer_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (out / "data_splits.json").write_text(json.dumps(record, indent=1, default=str))
    return out
