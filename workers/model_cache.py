"""Load base models and tokenizers once per worker process, and hand each trial a fresh copy.

A worker runs many trials of the same base model. Reading the weights from disk (or the hub) every
trial costs seconds to minutes; copying an in-memory pristine model costs milliseconds. `ModelCache`
keeps the pristine model on the CPU, keyed by (model, task, labels, dtype), and returns a deep copy
whose newly created head is re-initialised from the trial's seed, so a trial's result does not
depend on whether its model came from disk or from the cache.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunefleet.service.refs import looks_like_local_path
from tunefleet.workers.errors import ModelLoadError
from tunefleet.workers.tasks import Task

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["LoadedModel", "ModelCache", "check_local_path", "looks_like_local_path"]

_HINT = ("give a hub id, an uploaded model (tunefleet://NAME) or a local folder with config.json and the weights; "
         "with HF_HUB_OFFLINE=1 a hub id must already be in the local cache")


@dataclass
class LoadedModel:
    """A trial's own model copy and how it was obtained."""

    model: PreTrainedModel
    load_seconds: float  # wall time to obtain this copy (disk load, or copy from the cache)
    cached: bool  # True when the weights came from memory, not from disk


@dataclass
class _Entry:
    pristine: PreTrainedModel
    new_params: tuple[str, ...]  # parameters the checkpoint lacked (the new task head)


class ModelCache:
    """Pristine base models and tokenizers in CPU memory, least recently used evicted beyond `max_models`.

    Thread-safe; one instance per worker process. `model()` never returns the cached object itself.
    """

    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self._models: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def tokenizer(self, name: str) -> Any:
        """The tokenizer of `name` (hub id or path), loaded once; raises ModelLoadError."""
        with self._lock:
            if name not in self._tokenizers:
                from transformers import AutoTokenizer

                check_local_path(name, "tokenizer")
                try:
                    self._tokenizers[name] = AutoTokenizer.from_pretrained(name)
                except Exception as exc:  # OSError, ValueError, hub errors: all mean "cannot load"
                    raise ModelLoadError(
                        f"cannot load tokenizer {name!r}: {type(exc).__name__}: {exc}; {_HINT}") from exc
            return self._tokenizers[name]

    def model(self, name: str, task: Task, label_names: list[str] | None, *, seed: int,
              dtype: torch.dtype = torch.float32) -> LoadedModel:
        """A fresh copy of `name` with `task`'s head for `label_names`; raises ModelLoadError."""
        key = (name, task.name, tuple(label_names) if label_names else None, str(dtype))
        start = time.perf_counter()
        with self._lock:
            entry = self._models.get(key)
            cached = entry is not None
            if entry is None:
                entry = _load(name, task, label_names, dtype)
                self._models[key] = entry
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            model = copy.deepcopy(entry.pristine)
        _reinit(model, entry.new_params, seed)
        return LoadedModel(model, time.perf_counter() - start, cached)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._tokenizers.clear()


def _load(name: str, task: Task, label_names: list[str] | None, dtype: torch.dtype) -> _Entry:
    import transformers

    auto = getattr(transformers, task.auto_class)
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True}
    if task.uses_labels and label_names:
        names = [str(n) for n in label_names]  # config.json keeps string names, whatever the data held
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)})
    check_local_path(name, "model")
    try:
        model, info = auto.from_pretrained(name, **kwargs)
    except Exception as exc:  # missing path, unknown architecture, corrupt weights, no network
        raise ModelLoadError(f"cannot load model {name!r} for {task.name}: {type(exc).__name__}: {exc}; "
                             f"{_HINT}") from exc
    model.eval()
    return _Entry(model, tuple(info.get("missing_keys", ())))


def check_local_path(name: str, what: str) -> None:
    """Raise ModelLoadError naming the folder when `name` is a local path (see `looks_like_local_path`)
    that does not exist; do nothing otherwise.

    Without this, transformers treats the missing folder as a hub id and answers "Repo id must be in the
    form 'repo_name' or 'namespace/repo_name'", which hides that a path was mistyped or not copied here.
    """
    if not looks_like_local_path(name):
        _check_offline(name, what)
        return
    path = Path(name).expanduser()
    if path.exists():
        return
    # A relative path is read from wherever the worker was started, which is rarely where the spec was written.
    looked = "" if str(path.absolute()) == name else f" (looked for {path.absolute()})"
    raise ModelLoadError(f"{what} folder {name} does not exist on this worker{looked}; copy the folder to "
                         "this machine (or a shared disk) or give a hub id")


def _check_offline(hub_id: str, what: str) -> None:
    """With HF_HUB_OFFLINE set, raise ModelLoadError at once when `hub_id` is not in this node's hub cache,
    instead of letting transformers look in several places first; do nothing online."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return
    try:
        snapshot_download(hub_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise ModelLoadError(f"{what} {hub_id!r} is not in this node's hub cache and HF_HUB_OFFLINE is set, so it "
                             "cannot be downloaded: upload the model (`tunefleet model upload DIR --name NAME`, "
                             "then model: tunefleet://NAME), or download it to every node first") from None


def _reinit(model: nn.Module, new_params: tuple[str, ...], seed: int) -> None:
    # The head the checkpoint lacks was initialised once at load time; draw it again from the trial's seed.
    if not new_params:
        return
    std = getattr(model.config, "initializer_range", None) or 0.02
    generator = torch.Generator().manual_seed(seed)
    modules = {p.rsplit(".", 1)[0] for p in new_params if "." in p}
    with torch.no_grad():
        for path in sorted(modules):
            module = model.get_submodule(path)
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif callable(reset := getattr(module, "reset_parameters", None)):
                torch.manual_seed(seed)
                reset()
