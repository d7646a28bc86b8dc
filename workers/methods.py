"""Fine-tuning methods by name (param `method`): which weights of the base model a trial trains.

`METHODS` maps a name to a function `(model, config, task) -> model` that freezes or wraps the model.
A new method is one function plus one entry. Task heads (a classifier created for the study's labels)
always train: under PEFT they are listed in `modules_to_save`, so they are saved with the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from torch import nn

from tunefleet.workers.errors import InvalidConfig
from tunefleet.workers.tasks import Task

if TYPE_CHECKING:  # peft is imported when a PEFT method is applied, not with this module
    from peft import PeftMixedModel, PeftModel
    from transformers import PreTrainedModel

__all__ = ["METHODS", "apply_method", "count_parameters", "head_modules", "is_peft", "save_model",
           "transformer_layers"]

Config = Mapping[str, Any]
# What a method returns: the base model itself (partial, full) or a PEFT wrapper around it (lora, qlora, ia3).
Adapted: TypeAlias = "PreTrainedModel | PeftModel | PeftMixedModel"


def head_modules(model: nn.Module) -> list[str]:
    """Names of top-level modules with weights outside the pretrained backbone (e.g. `classifier`).

    A causal LM's `lm_head` is excluded: it is pretrained (often tied to the embeddings), not new.
    """
    prefix = getattr(model, "base_model_prefix", "")
    return [name for name, module in model.named_children()
            if name != prefix and name != "lm_head" and any(True for _ in module.parameters())]


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (the longest ModuleList: `encoder.layer`, `model.layers`, `transformer.h`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise InvalidConfig(f"{type(model).__name__} has no stack of transformer layers; method 'partial' "
                            "cannot pick its top layers: use lora, ia3 or full")
    return max(lists, key=len)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _target_modules(config: Config) -> list[str] | str | None:
    value = config.get("lora_target_modules")
    if value in (None, "", "auto"):
        return None  # peft's per-architecture default (query,value for BERT; q_proj,v_proj for llama)
    if value == "all-linear":
        return "all-linear"
    return [m.strip() for m in str(value).split(",") if m.strip()]


def _peft(model: PreTrainedModel, peft_config: Any) -> PeftModel | PeftMixedModel:
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # e.g. target modules that do not exist in this architecture
        raise InvalidConfig(f"cannot apply {type(peft_config).__name__} to {type(model).__name__}: {exc}. "
                            "Check lora_target_modules against the model's module names") from exc


def _lora(model: PreTrainedModel, config: Config, task: Task) -> Adapted:
    from peft import LoraConfig

    return _peft(model, LoraConfig(
        task_type=task.peft_task_type, r=int(config["lora_r"]),
        # peft annotates lora_alpha as int, but only divides by it (scaling = alpha / r): a float is valid.
        lora_alpha=float(config["lora_alpha"]),  # type: ignore[arg-type]
        lora_dropout=float(config["lora_dropout"]), target_modules=_target_modules(config),
        modules_to_save=head_modules(model) or None))


def _qlora(model: PreTrainedModel, config: Config, task: Task) -> Adapted:
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise InvalidConfig("method qlora trains LoRA on a base model loaded in 4 bits, and this one is not: the "
                            "worker loads it so only on a CUDA device with bitsandbytes installed")
    # Norms and the output layer in fp32 for stable training; no gradient checkpointing (no other method uses it).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _lora(model, config, task)


def _ia3(model: PreTrainedModel, config: Config, task: Task) -> Adapted:
    from peft import IA3Config

    targets = _target_modules(config)
    # peft's defaults name the feed-forward modules too; with explicit targets treat none as feed-forward.
    return _peft(model, IA3Config(task_type=task.peft_task_type, target_modules=targets,
                                  feedforward_modules=[] if targets not in (None, "all-linear") else None,
                                  modules_to_save=head_modules(model) or None))


def _partial(model: PreTrainedModel, config: Config, task: Task) -> Adapted:
    layers = transformer_layers(model)
    k = int(config["partial_top_k"])
    if not 1 <= k <= len(layers):
        raise InvalidConfig(f"partial_top_k={k} but the model has {len(layers)} layers; use 1..{len(layers)}")
    model.requires_grad_(False)
    for layer in list(layers)[-k:]:
        layer.requires_grad_(True)
    for name in head_modules(model):
        getattr(model, name).requires_grad_(True)
    if not head_modules(model) and hasattr(model, "lm_head"):
        # A causal LM has no new head; its (possibly tied) output projection adapts with the top layers.
        model.lm_head.requires_grad_(True)
    return model


def _full(model: PreTrainedModel, config: Config, task: Task) -> Adapted:
    model.requires_grad_(True)
    return model


METHODS: dict[str, Callable[[PreTrainedModel, Config, Task], Adapted]] = {
    "lora": _lora,
    "qlora": _qlora,
    "ia3": _ia3,
    "partial": _partial,
    "full": _full,
}


def apply_method(model: PreTrainedModel, config: Config, task: Task) -> Adapted:
    """Prepare `model` for training with `config['method']`; raises InvalidConfig for an unknown method."""
    name = config["method"]
    if name not in METHODS:
        raise InvalidConfig(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    adapted = METHODS[name](model, config, task)
    trainable, _ = count_parameters(adapted)
    if trainable == 0:
        raise InvalidConfig(f"method {name!r} left no trainable parameters; check its parameters")
    return adapted


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_model(model: Adapted, out_dir: Path) -> None:
    """save_pretrained in safetensors: the adapter (+ saved head) for PEFT, the whole model otherwise."""
    # transformers 5 and peft 0.21 both write safetensors by default.
    model.save_pretrained(str(out_dir))
