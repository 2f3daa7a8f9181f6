"""The one training loop that bootstrap SFT, warmup and distillation all use.

A stage brings a loss function and a data source; the loop owns the rest: accelerate (device, precision,
processes), the step budget, warmup + cosine schedule, gradient accumulation and clipping, periodic
evaluation, the progress bar and per-step metrics. Every piece of mutable state lives in `TrainingRun`
(model, optimizer, scheduler, RNG streams, step, data position) so that it can be saved and restored
as one object.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, Mapping[str, float]]]
EvalFn = Callable[[torch.nn.Module], Mapping[str, float]]
MetricsSink = Callable[[Mapping[str, float], int], None]


class TrainingConfig(BaseModel):
    """Budget and optimisation settings; budgets are optimizer steps, never seconds."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(gt=0, description="examples per forward pass and process")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a share of the peak rate")
    max_grad_norm: float | None = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    seed: int = 0
    checkpoint_every: int = Field(
        100, ge=0, description="save the resumable state every N steps when a state folder is set; 0: never"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    show_progress: bool = True


class BatchSource(Protocol):
    """Data for the loop, addressed by position so that a run can resume exactly where it stopped."""

    def batch(self, position: int) -> Batch: ...


class ShuffledBatches:
    """Fixed-size batches over a list of examples, reshuffled each epoch by a seeded permutation."""

    def __init__(
        self, examples: Sequence[Any], batch_size: int, collate_fn: Callable[[list], Batch], seed: int
    ):
        if not examples:
            raise ValueError("no training examples: the data source is empty")
        self.examples = examples
        self.batch_size = min(batch_size, len(examples))
        self.collate_fn = collate_fn
        self.seed = seed
        self.batches_per_epoch = len(examples) // self.batch_size  # drop the ragged tail: equal batch sizes
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            self._order_epoch = epoch
        return self._order

    def batch(self, position: int) -> Batch:
        epoch, index = divmod(position, self.batches_per_epoch)
        order = self._order_for(epoch)
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.collate_fn([self.examples[i] for i in chosen])


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine down to min_lr_ratio at max_steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    steps: int = 0


class NonFiniteLossError(FloatingPointError):
    pass


STATE_FILE = "state.pt"
# Where runs save their resumable state when none is passed: set around a node by the project's
# TrainingStateHook (a context variable, so the core needs no Kedro and nodes need no extra argument).
_STATE_FOLDER: ContextVar[Path | None] = ContextVar("training_state_folder", default=None)


def set_state_folder(folder: str | Path | None) -> None:
    """The folder under which `TrainingRun`s save and resume their state (None: nowhere)."""
    _STATE_FOLDER.set(Path(folder) if folder is not None else None)


class TrainingRun:
    """All state of one training run, and the loop that advances it."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        data: BatchSource,
        config: TrainingConfig,
        *,
        parameter_groups: Sequence[dict[str, Any]] | None = None,
        eval_fn: EvalFn | None = None,
        metrics_sink: MetricsSink | None = None,
        name: str = "train",
        state_folder: str | Path | None = None,
    ):
        self.config = config
        self.loss_fn = loss_fn
        self.data = data
        self.eval_fn = eval_fn
        self.metrics_sink = metrics_sink
        self.name = name
        self.accelerator = Accelerator(
            cpu=config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()),
            mixed_precision=config.mixed_precision,
        )
        seed_everything(config.seed)
        # Default: every trainable parameter at the configured rate. A stage with parts that learn at
        # their own rate (DSKD's projectors) passes its groups; a group without "lr" gets the default.
        groups = parameter_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        optimizer = torch.optim.AdamW(list(groups), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Stepped by hand, once per optimizer step: accelerate's wrapper would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, config.warmup_steps, config.max_steps, config.min_lr_ratio),
        )
        self.step = 0
        self.data_position = 0
        self.history: list[dict[str, float]] = []
        self.final_eval: dict[str, float] = {}
        # One sub-folder per run name: a node may train more than once (DSKD pre-trains its projectors).
        root = Path(state_folder) if state_folder is not None else _STATE_FOLDER.get()
        self.state_file = root / _slug(name) / STATE_FILE if root is not None else None

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data_position": self.data_position,
            "history": list(self.history),
            "final_eval": dict(self.final_eval),
            "rng": rng_state(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.data_position = state["data_position"]
        self.history = list(state["history"])
        self.final_eval = dict(state.get("final_eval", {}))
        set_rng_state(state["rng"])
        if state.get("data") is not None:  # sources with state of their own (the adaptive replay buffer)
            self.data.load_state_dict(state["data"])

    def save_state(self) -> None:
        """Write `state_dict()` to the state file atomically: a crash mid-write keeps the previous one."""
        assert self.state_file is not None
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_suffix(".partial")
        torch.save(self.state_dict(), partial)
        os.replace(partial, self.state_file)

    def resume(self) -> bool:
        """Load the saved state when there is one; True when the run continues from it."""
        if self.state_file is None or not self.state_file.is_file():
            return False
        state = torch.load(self.state_file, map_location="cpu", weights_only=False)  # our own file
        if state["step"] > self.config.max_steps:
            raise ValueError(
                f"{self.name}: the saved state {self.state_file} is at step {state['step']}, beyond "
                f"max_steps {self.config.max_steps}; delete it to start over"
            )
        self.load_state_dict(state)
        logger.info("%s: resuming from step %d (%s)", self.name, self.step, self.state_file)
        return True

    # -- loop ----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        config = self.config
        self.resume()
        progress = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc=self.name,
            disable=not (config.show_progress and self.accelerator.is_main_process),
            dynamic_ncols=True,
        )
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        while self.step < config.max_steps:
            metrics = self._optimizer_step()
            window.append(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                summary = _mean_metrics(window)
                summary["steps_per_second"] = len(window) / max(1e-9, time.perf_counter() - started)
                self._emit(summary)
                window, started = [], time.perf_counter()
            is_last = self.step == config.max_steps
            if self.eval_fn is not None and (
                is_last or (config.eval_every and self.step % config.eval_every == 0)
            ):
                self.final_eval = self.evaluate()
            if (
                self.state_file is not None
                and config.checkpoint_every
                and (is_last or self.step % config.checkpoint_every == 0)
            ):
                self.save_state()
        progress.close()
        return TrainResult(
            model=self.accelerator.unwrap_model(self.model),
            history=self.history,
            final_eval=self.final_eval,
            steps=self.step,
        )

    def _optimizer_step(self) -> dict[str, float]:
        config = self.config
        self.model.train()
        accumulated: list[Mapping[str, float]] = []
        for micro in range(config.gradient_accumulation_steps):
            batch = {k: v.to(self.accelerator.device) for k, v in self.data.batch(self.data_position).items()}
            last_micro = micro == config.gradient_accumulation_steps - 1
            sync = nullcontext() if last_micro else self.accelerator.no_sync(self.model)
            with sync, self.accelerator.autocast():
                loss, loss_metrics = self.loss_fn(self.model, batch)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"{self.name}: non-finite loss {loss.item()} at optimizer step {self.step + 1}, "
                        f"micro-batch {self.data_position} (epoch position of the data source)"
                    )
                self.accelerator.backward(loss / config.gradient_accumulation_steps)
            accumulated.append({"loss": loss.item(), **loss_metrics})
            self.data_position += 1
        clipping: dict[str, float] = {}
        if config.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            clipping["grad_norm"] = float(norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**_mean_metrics(accumulated), "learning_rate": lr, **clipping}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        assert self.eval_fn is not None
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        metrics = {f"eval/{k}": float(v) for k, v in self.eval_fn(model).items()}
        self._emit(metrics)
        return metrics

    def _emit(self, metrics: Mapping[str, float]) -> None:
        record = {"step": float(self.step), **metrics}
        self.history.append(record)
        if self.metrics_sink is not None and self.accelerator.is_main_process:
            self.metrics_sink(metrics, self.step)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "train"


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: BatchSource,
    config: TrainingConfig,
    **kwargs: Any,
) -> TrainResult:
    """Run `loss_fn` over `data` for `config.max_steps` optimizer steps."""
    return TrainingRun(model, loss_fn, data, config, **kwargs).run()


def _mean_metrics(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = {k for r in records for k in r}
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in sorted(keys)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
