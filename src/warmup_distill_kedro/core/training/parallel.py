"""accelerate's ways of training on several processes or devices, as the loop needs them: mixed precision
per run, sharded parameters (FSDP, DeepSpeed ZeRO-3), DeepSpeed's batch settings, gradient checkpointing
and copying full weights back into the caller's model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, broadcast_object_list

from warmup_distill_kedro.core.training.config import TrainingConfig


def allow_mixed_precision(mixed_precision: str) -> None:
    """Let this run use its own mixed precision in a process where an earlier run used another.

    accelerate keeps the precision in a per-process singleton (AcceleratorState) and refuses a second
    Accelerator with another one; a `kedro run` trains several nodes in one process, and their
    `training.mixed_precision` may differ (a float32 bootstrap, a bf16 stage). Only that part of the state
    is reset: the process group (PartialState) stays. DeepSpeed takes its precision from its own config.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        if state.get("distributed_type") != DistributedType.DEEPSPEED:
            AcceleratorState._reset_state()


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether the prepared model will hold only a shard of each parameter (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


_DEEPSPEED_CONFIGS: dict[int, dict[str, Any]] = {}


def fill_deepspeed_config(accelerator: Accelerator, config: TrainingConfig) -> None:
    """DeepSpeed sizes its batches from a DataLoader, which this loop has none of: fill its `auto`
    values from the training config. Untested here (no GPU, no deepspeed on the CPU box)."""
    plugin = accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config
    # accelerate fills `auto` values in place when it prepares a model, and the plugin is shared by every
    # Accelerator of the process: restore the config as launched before each run fills it for itself.
    original = _DEEPSPEED_CONFIGS.setdefault(id(plugin), copy.deepcopy(ds_config))
    ds_config.clear()
    ds_config.update(copy.deepcopy(original))
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        ds_config["train_micro_batch_size_per_gpu"] = config.batch_size
    if plugin.is_auto("gradient_clipping"):
        ds_config["gradient_clipping"] = config.max_grad_norm or 0.0


def _checkpointing_targets(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model itself when it is a transformers model, else its direct children that are (DSKD's
    `StudentWithProjectors` holds the student)."""
    if _is_transformers_model(model):
        return [model]
    return [child for child in model.children() if _is_transformers_model(child)]


def _is_transformers_model(module: torch.nn.Module) -> bool:
    return hasattr(module, "supports_gradient_checkpointing")


def _call_either(module: torch.nn.Module, name: str, older_name: str, **kwargs: Any) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing (the old names warn)."""
    if hasattr(module, name):
        getattr(module, name)(**kwargs)
    else:
        getattr(module, older_name)(**{k.replace("activation_", "gradient_"): v for k, v in kwargs.items()})


def enable_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """`training.gradient_checkpointing: true`: recompute activations in the backward pass."""
    targets = _checkpointing_targets(model)
    unsupported = [t for t in targets if not t.supports_gradient_checkpointing]
    if not targets or unsupported:
        raise ValueError(
            f"training.gradient_checkpointing is true, but {type((unsupported or [model])[0]).__name__} does "
            "not support gradient checkpointing; set training.gradient_checkpointing: false"
        )
    for target in targets:
        # Non-reentrant: works with DDP's no_sync, with inputs that need no grad, and under FSDP.
        _call_either(
            target,
            "activation_checkpointing_enable",
            "gradient_checkpointing_enable",
            activation_checkpointing_kwargs={"use_reentrant": False},
        )
    return True


def disable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Undo `enable_gradient_checkpointing` on a trained model (it will be evaluated and saved as it is)."""
    for target in _checkpointing_targets(model):
        _call_either(target, "activation_checkpointing_disable", "gradient_checkpointing_disable")


@torch.no_grad()
def broadcast_into(
    model: torch.nn.Module, full: Mapping[str, torch.Tensor], accelerator: Accelerator
) -> None:
    """Copy the main process's `full` state dict into `model` on every process, tensor by tensor (the
    main process's tensors are cast to the model's dtype; other processes pass an empty dict)."""
    names = list(full) if accelerator.is_main_process else None
    names = broadcast_object_list([names])[0] if accelerator.num_processes > 1 else names
    own = model.state_dict()
    missing = [name for name in names if name not in own]
    if missing:
        raise KeyError(f"the trained weights have entries the model lacks: {missing[:5]}")
    for name in names:
        destination = own[name]
        if accelerator.is_main_process:
            tensor = full[name].to(device=accelerator.device, dtype=destination.dtype)
        else:
            tensor = torch.empty_like(destination, device=accelerator.device)
        if accelerator.num_processes > 1:
            torch.distributed.broadcast(tensor, src=0)
        destination.copy_(tensor)
