"""The study spec: what a user submits, validated once, stored unchanged with the study.

A spec is YAML or JSON. `StudySpec.model_validate(data)` raises `pydantic.ValidationError`; the API
turns every error into a 422 entry naming its field path and the fix. This module imports no torch:
the server validates specs, the workers interpret them.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "COST_METRICS",
    "Direction",
    "MULTI_OBJECTIVE_SAMPLERS",
    "GENERATIVE_TASKS",
    "PAUSING_PRUNERS",
    "SCORER_METRIC",
    "TASK_METRICS",
    "TRAINING_DEFAULTS",
    "TRAINING_PARAMS",
    "BUILTIN_TASKS",
    "BudgetSpec",
    "CategoricalParam",
    "CheckpointSpec",
    "CheckpointStorage",
    "ConstraintSpec",
    "FailureKind",
    "DataSpec",
    "EvaluationSpec",
    "FloatParam",
    "IntParam",
    "ObjectiveSpec",
    "ParamKind",
    "PrunerName",
    "ReportAction",
    "ResourcesSpec",
    "SamplerName",
    "STUDY_FAILURES",
    "SearchSpec",
    "SpecError",
    "StudySpec",
    "StudyTask",
    "TaskName",
    "WarmStartSpec",
    "checkpoint_storage",
    "constraint_violations",
    "gpus_per_trial",
    "objectives_of",
    "validate_spec",
    "parse_spec_text",
]

# The names below are spelled once each: the spec's fields take these Literal types (so the JSON schema
# lists the choices and a wrong name is refused with them), and the other catalogues are keyed by them.
TaskName = Literal["sequence-classification", "token-classification", "causal-lm", "sft"]
# The tasks the built-in worker trains; `script` studies run the user's own program under `tunefleet agent`
# (any parameters, any metrics). A lease request names the tasks its worker runs (LeaseIn.tasks).
BUILTIN_TASKS: tuple[TaskName, ...] = get_args(TaskName)
StudyTask = Literal[TaskName, "script"]
# Keys of tunefleet.service.search.SAMPLERS / PRUNERS, the builders (tests/test_catalogues.py pins them).
Direction = Literal["maximize", "minimize"]
SamplerName = Literal["tpe", "mf-tpe", "mf-gp", "gp", "random", "qmc", "grid", "cmaes", "nsga2"]
PrunerName = Literal["hyperband", "successive_halving", "median", "asha", "freeze-thaw", "none"]
# Pruners that answer "pause" (the trial saves a checkpoint and frees its worker; it may be resumed later).
PAUSING_PRUNERS: tuple[PrunerName, ...] = ("asha", "freeze-thaw")
# Why a trial failed, as the worker classifies it. The first three are failures of the study itself (every
# trial fails alike until someone fixes it): after budget.max_consecutive_failures of one of them in a row
# the study pauses itself. The others depend on the trial's parameters.
FailureKind = Literal["model", "data", "config", "memory", "diverged", "trial", "crash"]
STUDY_FAILURES: tuple[FailureKind, ...] = ("model", "data", "config")
# The server's answer to a report: go on training, stop for good, or checkpoint and free the worker.
ReportAction = Literal["continue", "prune", "pause"]
# Where a paused trial's checkpoint lives: uploaded to the server's artifact store (any worker can resume it),
# on the disk of the node that paused it (only that node's workers resume it), or nowhere (never pause:
# a pause answer becomes a prune). "auto": upload for adapter methods, node for full fine-tuning.
CheckpointStorage = Literal["auto", "upload", "node", "none"]
ParamKind = Literal["str", "int", "float"]

# Metrics each task's evaluation produces; an objective must name one of them. The workers' tasks
# (tunefleet.workers.tasks) read their metric names from here.
TASK_METRICS: dict[TaskName, tuple[str, ...]] = {
    "sequence-classification": ("accuracy", "precision_macro", "recall_macro", "f1_macro", "loss"),
    "token-classification": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy", "loss"),
    "causal-lm": ("exact_match", "attribute_f1", "attribute_precision", "attribute_recall", "loss"),
    "sft": ("exact_match", "loss"),
}
# Tasks evaluated on what the model generates (evaluation.max_new_tokens applies to them).
GENERATIVE_TASKS: tuple[TaskName, ...] = ("causal-lm", "sft")
# The metric a user-given scorer (`evaluation.scorer`, task sft) produces: its mean over the generations.
SCORER_METRIC = "score"

# What a trial costs, measured by the worker itself for every task (reported in the trial's `extra`): wall
# seconds of training, device-hours (seconds × devices / 3600; 0 on CPU), peak memory in MiB (CUDA's peak
# allocation, or the process's peak resident set on CPU) and training samples per second. Objectives and
# constraints may name them besides the task's metrics; cost metrics are usually minimized.
COST_METRICS: tuple[str, ...] = ("train_seconds", "gpu_hours", "peak_memory_mb", "samples_per_second")

# Training parameters a worker understands, searchable or fixed: the kind of value each takes ("str"
# parameters are categorical-only) and the value a worker uses when a study neither fixes nor searches it.
# The defaults are "library defaults" for LoRA (peft / HF examples), so a spec's baseline means something;
# None leaves the value to the worker (tunefleet.workers.training), as commented.
_TRAINING_CATALOGUE: dict[str, tuple[ParamKind, Any]] = {
    "method": ("str", "lora"),  # lora | qlora (4-bit base, CUDA + bitsandbytes) | ia3 | partial | full
    "learning_rate": ("float", 5e-5),
    "weight_decay": ("float", 0.0),
    "warmup_ratio": ("float", 0.0),
    "lr_scheduler": ("str", "linear"),  # linear | cosine | constant | constant_with_warmup | ...
    "optimizer": ("str", "adamw_torch"),  # adamw_torch | adafactor | sgd | ...
    "adam_beta2": ("float", 0.999),
    "max_grad_norm": ("float", 1.0),
    "per_device_batch_size": ("int", 16),
    "gradient_accumulation_steps": ("int", 1),
    "num_epochs": ("float", 1.0),
    "max_steps": ("int", None),  # None: num_epochs decides the budget
    "max_seq_length": ("int", 128),
    "train_size": ("int", None),  # training examples used (data-efficiency curves); None: all of them
    "lora_r": ("int", 8),
    "lora_alpha": ("float", None),  # None: 2 × lora_r
    "lora_dropout": ("float", 0.1),
    "lora_target_modules": ("str", None),  # comma-separated module names, or "all-linear"; None: peft's default
    "partial_top_k": ("int", 2),  # partial fine-tuning: train only the top k transformer layers
    "label_smoothing": ("float", 0.0),
    "precision": ("str", "auto"),  # auto | fp32 | bf16 | fp16
    "eval_batch_size": ("int", 64),
    "seed": ("int", None),  # None: the spec's seed
}
TRAINING_PARAMS: dict[str, ParamKind] = {name: kind for name, (kind, _) in _TRAINING_CATALOGUE.items()}
TRAINING_DEFAULTS: dict[str, Any] = {name: default for name, (_, default) in _TRAINING_CATALOGUE.items()}

# Samplers that handle several objectives; the others are single-objective.
MULTI_OBJECTIVE_SAMPLERS: tuple[SamplerName, ...] = ("nsga2", "random", "tpe", "grid")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _check_range(self) -> FloatParam:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"empty or inverted range: low={self.low} >= high={self.high}; make low < high")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must be above zero (low={self.low}); use low > 0 or log: false")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot both be set; drop one")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be > 0")
        return self


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _check_range(self) -> IntParam:
        if self.low >= self.high:
            raise ValueError(f"empty or inverted range: low={self.low} >= high={self.high}; make low < high")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must be above zero (low={self.low}); use low >= 1 or log: false")
        if self.log and self.step != 1:
            raise ValueError("step must be 1 with log: true")
        if self.step <= 0:
            raise ValueError("step must be >= 1")
        return self


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[str | int | float | bool | None] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _unique(cls, choices: list[Any]) -> list[Any]:
        if len({repr(c) for c in choices}) != len(choices):
            raise ValueError("choices must be unique")
        return choices


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class ObjectiveSpec(_Strict):
    metric: str
    direction: Direction = "maximize"


# One objective, or a list of at least one (an empty list would leave a study with nothing to optimise).
Objectives = ObjectiveSpec | Annotated[list[ObjectiveSpec], Field(min_length=1)]


def _listed(objective: ObjectiveSpec | list[ObjectiveSpec]) -> list[ObjectiveSpec]:
    return objective if isinstance(objective, list) else [objective]


class ConstraintSpec(_Strict):
    """A bound on a metric a trial reports: a completed trial outside it is infeasible (never best, never on
    the Pareto front), and samplers that support constraints steer away from it."""

    metric: str = Field(min_length=1, max_length=200)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ConstraintSpec:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both: e.g. {metric: peak_memory_mb, max: 8000}")
        if any(b is not None and not math.isfinite(b) for b in (self.min, self.max)):
            raise ValueError("min and max must be finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} is above max={self.max}: make min <= max")
        return self

    def violations(self, value: float) -> dict[str, float]:
        """Optuna's constraint values for `value`, one per bound, named `<metric>:min` / `<metric>:max`:
        how far it lies outside the bound (> 0: violated, <= 0: satisfied)."""
        out: dict[str, float] = {}
        if self.min is not None:
            out[f"{self.metric}:min"] = self.min - value
        if self.max is not None:
            out[f"{self.metric}:max"] = value - self.max
        return out


class _ObjectiveOnly(BaseModel):
    """A spec read for its objective alone; other keys are ignored (StudySpec checks them)."""

    objective: Objectives


class DataSpec(_Strict):
    """Where the examples come from: local files (jsonl, csv, parquet) or a hub data set id."""

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    dataset: str | None = None  # hub id for `datasets.load_dataset`
    dataset_config: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation"
    test_split: str | None = "test"
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    tokens: str = "tokens"  # token-classification: list of words
    tags: str = "tags"  # token-classification: list of BIO tags (strings or ints)
    prompt: str = "prompt"  # causal-lm, sft: input text (sft: or a list of chat messages)
    target: str = "target"  # causal-lm: JSON object of attributes (or its string)
    completion: str = "completion"  # sft: the answer to learn (a string, or a list of chat messages)
    messages: str = "messages"  # sft: a chat, [{role, content}, ...]; the last (assistant) message is learned
    validation_fraction: float = Field(0.15, gt=0, lt=0.9)
    test_fraction: float = Field(0.15, gt=0, lt=0.9)
    split_seed: int = 0
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if not self.train and not self.dataset:
            raise ValueError("name the training data: data.train (a local file) or data.dataset (a hub id)")
        if self.train and self.dataset:
            raise ValueError("give either data.train (local files) or data.dataset (hub id), not both")
        return self


class SearchSpec(_Strict):
    sampler: SamplerName = "tpe"
    # Cost-aware freeze-thaw (pause, resume, new, by expected improvement per unit of cost): on both recorded
    # tasks it reaches full-budget TPE's result with about half its compute, TPE + Hyperband with over 0.8x
    # (docs/search_quality.md). Optuna's pruners stay a word away.
    pruner: PrunerName = "freeze-thaw"
    min_resource: float = Field(0.2, gt=0, le=1, description="first rung, as a fraction of the training budget")
    reduction_factor: int = Field(3, ge=2)
    rungs: list[int] | None = Field(None, description="explicit rungs in percent of the budget (1..100)")
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0, description="median pruner: no pruning before this percent")
    multivariate: bool = True
    constant_liar: bool = True
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="the sampler's seed (numpy's range)")
    max_retries: int = Field(2, ge=0, description="re-queues of a trial whose lease expired")
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    pruner_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, rungs: list[int] | None) -> list[int] | None:
        if rungs is None:
            return None
        if not rungs or any(not 1 <= r <= 100 for r in rungs) or sorted(set(rungs)) != rungs:
            raise ValueError("rungs must be increasing percents between 1 and 100, e.g. [20, 60, 100]")
        return rungs


class WarmStartSpec(_Strict):
    study: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                       description="an earlier study (by name) whose best configurations run first")
    top_k: int = Field(5, ge=1, le=100, description="how many of its best completed configurations to enqueue")


class CheckpointSpec(_Strict):
    storage: CheckpointStorage = Field(
        "auto", description="where paused trials keep their checkpoint: upload (to the server's artifact store; "
        "any worker resumes), node (the worker's disk; only that node resumes), none (never pause: prune "
        "instead), auto (upload for LoRA-style methods, node for full fine-tuning)")
    keep: Literal["final", "all"] = Field(
        "final", description="final: delete a trial's rung checkpoints once it finishes (its final model stays "
        "as its artifacts); all: keep every uploaded rung checkpoint")


def checkpoint_storage(spec: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """Where a trial with `params` keeps its checkpoints: upload, node or none ("auto" resolved by its method:
    a full fine-tuning checkpoint holds the whole model and its optimizer state, about three times the model)."""
    storage = str((spec.get("checkpoints") or {}).get("storage", "auto"))
    if storage != "auto":
        return storage
    if spec.get("task") == "script":
        return "upload"  # a script's checkpoint is whatever it writes: any agent can resume it
    method = params.get("method", (spec.get("fixed") or {}).get("method", TRAINING_DEFAULTS["method"]))
    return "node" if method == "full" else "upload"


class EvaluationSpec(_Strict):
    """How generative tasks generate, and how task sft scores generations besides loss and exact match."""

    scorer: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="module:function importable on the workers, called as function(prediction, reference) -> "
        "float for each example; its mean is the metric 'score'")
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096, description="tokens generated per example; default: the longest training "
        "completion + 8, at most 256")


def gpus_per_trial(spec: Mapping[str, Any]) -> int:
    """How many devices a trial of a spec dict (as a worker gets it, plain JSON) trains on."""
    return int((spec.get("resources") or {}).get("gpus_per_trial", 1))


class BudgetSpec(_Strict):
    max_trials: int = Field(32, ge=1)
    max_gpu_hours: float | None = Field(None, gt=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    max_consecutive_failures: int = Field(
        3, ge=1, description="the study pauses itself after this many trials in a row fail for one reason of "
        "the study's own (the model or data cannot be loaded, the configuration is invalid)")


class ResourcesSpec(_Strict):
    gpus_per_trial: int = Field(
        1, description="devices one trial trains on: 1, or N for data-parallel training (DDP) over N devices of "
        "one node; only workers started with --nproc N or more lease its trials")

    @field_validator("gpus_per_trial")
    @classmethod
    def _at_least_one(cls, n: int) -> int:
        if n < 1:
            raise ValueError(f"gpus_per_trial={n}: a trial needs at least one device; use 1, or N >= 2 for DDP")
        return n


class StudySpec(_Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    project: str = Field("default", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                         description="the project the study belongs to: who may see and change it (see docs/api.md)")
    description: str = ""
    model: str | None = Field(None, min_length=1, description="hub id or local path of the base model (required "
                              "by the built-in tasks; a script study may name the model its script trains)")
    tokenizer: str | None = None
    task: StudyTask
    data: DataSpec | None = Field(None, description="the examples (required by the built-in tasks; a script "
                                  "study's script reads its own)")
    objective: Objectives
    constraints: list[ConstraintSpec] = Field(
        default_factory=list, description="bounds on reported metrics (task or cost metrics); a completed trial "
        "outside one is infeasible: never the best trial nor on the Pareto front")
    search_space: dict[str, Param] = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    baseline: dict[str, Any] | None = Field(
        None, description="parameters enqueued as the first trial, so tuned vs default is measurable"
    )
    search: SearchSpec = Field(default_factory=SearchSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    warm_start: WarmStartSpec | None = Field(
        None, description="enqueue the best configurations of an earlier study, after the baseline")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the training seed of every trial")

    @property
    def objectives(self) -> list[ObjectiveSpec]:
        return _listed(self.objective)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def rung_values(self) -> bool:
        """Whether rung reports are the objective's intermediate values (Optuna's `Trial.report`): only for one
        objective that evaluations measure; a cost is known at the end only."""
        return not self.multi_objective and self.objectives[0].metric not in COST_METRICS

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems pydantic's per-field checks cannot see, each as (field path, message)."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        script = self.task == "script"
        for name, param in self.search_space.items():
            msg = _script_param_problem(name) if script else _param_name_problem(name)
            if msg:
                problems.append((("search_space", name), msg))
                continue
            if script:
                continue  # a script's parameters take whatever values its search space says
            kind = TRAINING_PARAMS[name]
            if kind == "str" and not isinstance(param, CategoricalParam):
                problems.append((("search_space", name), f"{name} takes names: use type: categorical with choices"))
            if kind == "int" and isinstance(param, FloatParam):
                problems.append((("search_space", name, "type"), f"{name} is an integer: use type: int"))
        for name in self.fixed:
            msg = _script_param_problem(name) if script else _param_name_problem(name)
            if msg:
                problems.append((("fixed", name), msg))
        problems.extend(((field,), f"required by task {self.task}: add it (only task: script may leave it out)")
                        for field in ("model", "data") if not script and getattr(self, field) is None)
        problems.extend(self._metric_problems())
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            problems.append((("objective",), "the same metric is listed twice; list each once"))
        for name in sorted(set(self.search_space) & set(self.fixed)):
            problems.append((("fixed", name), f"{name} is both searched and fixed; keep it in one place"))
        if self.multi_objective and self.search.sampler not in MULTI_OBJECTIVE_SAMPLERS:
            problems.append((("search", "sampler"), f"{self.search.sampler} is single-objective; with several "
                             f"objectives use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}"))
        if self.multi_objective and self.search.pruner != "none":
            problems.append((("search", "pruner"), "pruning needs a single objective: set search.pruner: none"))
        elif not self.rung_values and self.search.pruner != "none":
            problems.append((("search", "pruner"), f"pruning compares rung scores, and {self.objectives[0].metric} "
                             "is only known at the end of a trial: set search.pruner: none"))
        if self.search.sampler == "grid":
            for name, p in self.search_space.items():
                if isinstance(p, FloatParam) and p.step is None:
                    problems.append((("search_space", name, "step"),
                                     "search.sampler grid needs a finite grid: give this float parameter a step"))
        if self.baseline is not None:
            problems.extend(self._baseline_problems())
        if self.evaluation.scorer and self.task != "sft":
            problems.append((("evaluation", "scorer"), f"task {self.task} does not generate free text to score; "
                             "a scorer needs task: sft (drop evaluation.scorer)"))
        if self.evaluation.max_new_tokens and self.task not in GENERATIVE_TASKS:
            problems.append((("evaluation", "max_new_tokens"), f"task {self.task} generates nothing; "
                             f"max_new_tokens applies to {' and '.join(GENERATIVE_TASKS)} (drop it)"))
        return problems

    def metrics(self) -> tuple[str, ...]:
        """The metrics this study's evaluations report: the task's, plus 'score' when sft has a scorer; none
        known in advance for a script (it reports any)."""
        if self.task == "script":
            return ()
        scored = (SCORER_METRIC,) if self.task == "sft" and self.evaluation.scorer else ()
        return (*TASK_METRICS[self.task], *scored)

    def _metric_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Objectives and constraints that name a metric no trial of this task reports."""
        if self.task == "script":
            return []  # a script reports any metric
        metrics = (*self.metrics(), *COST_METRICS)
        problems: list[tuple[tuple[str | int, ...], str]] = []
        named: list[tuple[tuple[str | int, ...], str]] = [
            (("objective", i, "metric") if self.multi_objective else ("objective", "metric"), o.metric)
            for i, o in enumerate(self.objectives)]
        named += [(("constraints", i, "metric"), c.metric) for i, c in enumerate(self.constraints)]
        for loc, metric in named:
            if metric not in metrics:
                scorer_hint = (" (set evaluation.scorer to a module:function for 'score')"
                               if metric == SCORER_METRIC and self.task == "sft" else "")
                problems.append((loc, f"metric {metric!r} is not produced by task {self.task}{scorer_hint}; use "
                                 f"one of its metrics ({', '.join(self.metrics())}) or a cost metric "
                                 f"({', '.join(COST_METRICS)})"))
        return problems

    def param_problems(self, params: Mapping[str, Any], where: tuple[str | int, ...]
                       ) -> list[tuple[tuple[str | int, ...], str]]:
        """Why `params` (a configuration to run) do not fit the search space: an unsearched name, a value
        outside its range or choices; each as (field path under `where`, message)."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for name, value in params.items():
            param = self.search_space.get(name)
            loc = (*where, name)
            if param is None:
                problems.append((loc, f"{name} is neither searched nor fixed; add it to search_space or drop it"
                                 if name not in self.fixed else f"{name} is fixed in this study; drop it"))
            elif isinstance(param, CategoricalParam):
                if value not in param.choices:
                    problems.append((loc, f"{value!r} is not one of the choices {param.choices}"))
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                problems.append((loc, f"{value!r} is not a number; give a value in [{param.low}, {param.high}]"))
            elif not (param.low <= value <= param.high):
                problems.append((loc, f"{value} lies outside [{param.low}, {param.high}]; move it inside the range"))
            elif isinstance(param, IntParam) and value != int(value):
                problems.append((loc, f"{value} is not an integer; {name} takes whole numbers"))
        return problems

    def _baseline_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        assert self.baseline is not None
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for name, value in self.baseline.items():
            if name in self.fixed:
                continue
            problems.extend(self.param_problems({name: value}, ("baseline",)))
        missing = [n for n in self.search_space if n not in self.baseline]
        if missing:
            problems.append((("baseline",), f"the baseline must give every searched parameter; add {missing}"))
        return problems

    def rungs(self) -> list[int]:
        """Percent of the training budget at which workers evaluate and report, ending at 100."""
        if self.search.rungs:
            rungs = list(self.search.rungs)
        else:
            rungs = []
            resource = self.search.min_resource * 100
            while resource < 100 - 1e-9:
                rungs.append(max(1, round(resource)))
                resource *= self.search.reduction_factor
        if not rungs or rungs[-1] != 100:
            rungs.append(100)
        return sorted(set(rungs))


_SCRIPT_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _script_param_problem(name: str) -> str | None:
    """A script's parameters become environment variables (TUNEFLEET_PARAM_<NAME>) and `{name}` placeholders
    of its command line, so their names are identifiers."""
    if _SCRIPT_PARAM_NAME.match(name):
        return None
    return (f"parameter name {name!r} cannot name an environment variable (TUNEFLEET_PARAM_<NAME>) or a {{name}} "
            "placeholder: use letters, digits and _, not starting with a digit")


def _param_name_problem(name: str) -> str | None:
    if name in TRAINING_PARAMS:
        return None
    close = difflib.get_close_matches(name, TRAINING_PARAMS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(TRAINING_PARAMS)}"
    return f"unknown training parameter {name!r}; {hint}"


class SpecError(ValueError):
    """A spec that cannot be accepted; `errors` lists every problem as {loc, msg, type}."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


def validate_spec(data: Any) -> StudySpec:
    """Validate a parsed spec; raises SpecError naming every offending field and its fix."""
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_pydantic_error(e) for e in exc.errors()]) from None
    problems = spec.problems()
    if problems:
        raise SpecError([{"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in problems])
    return spec


def objectives_of(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A spec dict's objectives as (metric, direction) pairs in spec order, with ObjectiveSpec's defaults.

    For workers, which get the stored spec as plain JSON. Only the objective is read; raises SpecError
    when it is missing or malformed.
    """
    try:
        objective = _ObjectiveOnly.model_validate(spec).objective
    except ValidationError as exc:
        raise SpecError([_pydantic_error(e) for e in exc.errors()]) from None
    return [(o.metric, o.direction) for o in _listed(objective)]


def constraint_violations(spec: StudySpec, reported: Mapping[str, Any]) -> dict[str, float]:
    """Optuna's constraint values of a completed trial (`ConstraintSpec.violations` of each constraint) from the
    metrics it reported; raises KeyError naming a constraint metric that is missing or not a finite number."""
    out: dict[str, float] = {}
    for constraint in spec.constraints:
        value = reported.get(constraint.metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KeyError(constraint.metric)
        out.update(constraint.violations(float(value)))
    return out


_FIXES = {
    "extra_forbidden": "unknown key: remove it or check its spelling (see docs/configuration.md)",
    "missing": "required: add it",
    "literal_error": None,
}


def _pydantic_error(error: Any) -> dict[str, Any]:
    loc = [part for part in error["loc"] if part not in ("float", "int", "categorical")]
    msg = error["msg"].removeprefix("Value error, ")
    fix = _FIXES.get(error["type"])
    if fix:
        msg = f"{msg}; {fix}"
    return {"loc": loc, "msg": msg, "type": error["type"]}


def parse_spec_text(text: str) -> dict[str, Any]:
    """Parse a spec file's text into a plain dict; raises ValueError on a syntax error.

    JSON is parsed as JSON. Anything else is YAML, with YAML 1.2's numbers: PyYAML follows YAML 1.1, where
    `5e-5` (no dot) is the string '5e-5', which a spec would then refuse as a learning rate.
    """
    import json

    import yaml

    json_error: json.JSONDecodeError | None = None
    if text.lstrip().startswith(("{", "[")):
        try:
            return _mapping(json.loads(text))
        except json.JSONDecodeError as exc:
            json_error = exc  # perhaps YAML's flow style: try that before giving up
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        if json_error is not None:
            raise ValueError(f"the spec is not valid JSON: {json_error}") from json_error
        raise ValueError(f"the spec is not valid YAML: {exc}") from exc
    return _mapping(data)


def _mapping(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("the spec must be a mapping (name, model, task, data, objective, search_space, ...)")
    return data


def _yaml12_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader whose floats follow YAML 1.2 (`1e-5`, `5E+3` without a dot are floats)."""

    float_re = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                              |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                              |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                              |[-+]?\.(?:inf|Inf|INF)
                              |\.(?:nan|NaN|NAN))$""", re.X)
    Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return Loader


_Yaml12Loader = _yaml12_loader()
