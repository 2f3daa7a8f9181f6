"""A student cut from its teacher: the same model with a subset of its decoder layers.

The third way to start a student, beside building one from a config (`modeling.build_model`) and loading
a checkpoint: keep some of the teacher's layers, with its embeddings, final norm, head and tokenizer
(DistilBERT's and Minitron's depth pruning). The student then shares the teacher's vocabulary, which
every token-level KD objective needs, and starts from weights that already model language.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.models.conversion import AlreadyConverted
from warmup_distill_kedro.core.models.modeling import Checkpoint, count_parameters

KeepLayers = int | list[int]


def resolve_keep_layers(keep: KeepLayers, num_layers: int, parameter: str) -> list[int]:
    """The layer indices to keep: a list as given (increasing, in range), or `n` evenly spaced layers
    that include the first and the last (`n` rounded points of `linspace(0, num_layers - 1, n)`)."""
    if isinstance(keep, bool) or not isinstance(keep, int | list):
        raise UserInputError(f"{parameter}: give a number of layers or a list of layer indices, got {keep!r}")
    if isinstance(keep, int):
        if not 2 <= keep <= num_layers:
            raise UserInputError(
                f"{parameter}: {keep} layers cannot be kept evenly from a model of {num_layers} layers "
                f"(give 2 to {num_layers}, or a list of indices such as [0])"
            )
        return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]
    if not keep:
        raise UserInputError(f"{parameter}: the list of layers to keep is empty")
    bad = [i for i in keep if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise UserInputError(
            f"{parameter}: layer indices {bad} out of range; the model has layers 0 to {num_layers - 1}"
        )
    duplicates = sorted({i for i in keep if keep.count(i) > 1})
    if duplicates:
        raise UserInputError(f"{parameter}: layers {duplicates} are listed more than once")
    if keep != sorted(keep):
        raise UserInputError(f"{parameter}: list the layers in increasing order, got {keep}")
    return list(keep)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (`model.model.layers` in llama, qwen2, gemma3, mistral...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserInputError(
            f"a {model.config.model_type} model keeps its layers elsewhere than model.layers; "
            "layers can only be kept from decoder models laid out like llama, qwen2 or gemma"
        )
    return layers


def keep_layers(teacher: Checkpoint, keep: KeepLayers, parameter: str = "keep_layers") -> Checkpoint:
    """A new model with the teacher's layers `keep` (in order) and everything else of the teacher."""
    num_layers = len(decoder_layers(teacher.model))
    kept = resolve_keep_layers(keep, num_layers, parameter)
    config = _config_with_layers(teacher.model.config, kept)
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.model.dtype)
    student.load_state_dict(_kept_state_dict(teacher.model.state_dict(), kept), strict=True)
    student.generation_config = copy.deepcopy(teacher.model.generation_config)
    metadata = {
        "stage": "keep_layers",
        "keep_layers": kept,
        "teacher_layers": num_layers,
        "params": count_parameters(student),
        "started_from": {
            key: teacher.metadata.get(key) for key in ("catalog_version", "path", "source_sha256")
        },
    }
    return Checkpoint(model=student.eval(), tokenizer=teacher.tokenizer, metadata=metadata)


def keep_layers_once(
    teacher: Checkpoint, keep: KeepLayers, previous: dict[str, Any], parameter: str = "keep_layers"
) -> Checkpoint | AlreadyConverted:
    """`keep_layers`, unless `previous` (the latest saved cut's metadata) kept the same layers of the same
    teacher version."""
    kept = resolve_keep_layers(keep, len(decoder_layers(teacher.model)), parameter)
    teacher_version = teacher.metadata.get("catalog_version")
    cut_from = previous.get("started_from") or {}
    if (
        teacher_version
        and cut_from.get("catalog_version") == teacher_version
        and previous.get("keep_layers") == kept
    ):
        return AlreadyConverted(previous)
    return keep_layers(teacher, kept, parameter)


def _config_with_layers(config: Any, kept: list[int]) -> Any:
    """The teacher's config for `len(kept)` layers; per-layer settings (sliding or full attention) follow
    the layers they belong to."""
    config = copy.deepcopy(config)
    per_layer = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(kept)
    if isinstance(per_layer, list):
        config.layer_types = [per_layer[i] for i in kept]
    return config


def _kept_state_dict(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's weights renamed for the student: `model.layers.<kept[j]>.*` becomes `model.layers.<j>.*`."""
    new_index = {old: new for new, old in enumerate(kept)}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            old = int(parts[2])
            if old not in new_index:
                continue
            name = ".".join([*parts[:2], str(new_index[old]), *parts[3:]])
        out[name] = tensor.clone()
    return out
