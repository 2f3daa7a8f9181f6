"""The settings every KD loss shares, declared once: `KDConfig` (losses.py), `DSKDConfig` (dual_space.py) and
the distill stage's `DistillConfig` (cell.py) extend them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KDSettings(BaseModel):
    """How the teacher's and the student's distributions are compared and mixed with the CE term."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(
        2.0, gt=0, allow_inf_nan=False, description="both models' logits are divided by it (no T^2 factor)"
    )
    kd_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="loss = (1 - kd_rate) CE + kd_rate KD, the CE on gold or teacher-written responses only: "
        "on a batch the student sampled itself (data modes on_policy, adaptive) the loss is kd_rate KD",
    )
    chunk_size: int | None = Field(
        None,
        gt=0,
        description="positions per chunk of the KD loss at most (memory); null: sized for the device",
    )

    def shared_settings(self) -> dict[str, float | int | None]:
        """These settings alone, of a subclass that adds its own: to build another loss on them."""
        return {name: getattr(self, name) for name in KDSettings.model_fields}
