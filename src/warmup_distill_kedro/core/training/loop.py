"""The one training loop that bootstrap SFT, warmup and distillation all use.

A stage brings a loss function and a data source; the loop owns the rest: accelerate (device, precision,
processes), the step budget, warmup + cosine schedule, gradient accumulation and clipping, periodic
evaluation, the progress bar and per-step metrics. Every piece of mutable state lives in `TrainingRun`
(model, optimizer, scheduler, RNG streams, step, data position) so that it can be saved and restored
as one object.

Data parallel (`accelerate launch` with N processes; docs/scaling.md): every process holds the whole
data source and reads its own share of each global batch, process r reading position
`data_position + r` while `data_position` advances by N per micro-batch. With `ShuffledBatches` an
optimizer step then sees the same examples as one process with N times the batch (within an epoch), and
`data_position` counts batches of the source whatever the number of processes, so a saved state stays
meaningful. Gradients are averaged across processes (DDP), so a loss that is a mean over tokens gives
the single-process gradient exactly when every process has the same number of tokens. Logged metrics
are the mean over processes; every process evaluates (the weights are identical, and a source that
adapts to the validation loss must see it on every process); only the main process reports metrics
and writes the resumable state.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from tqdm.auto import tqdm

from warmup_distill_kedro.core.durable import fsync_dir, fsync_file, partial_path
from warmup_distill_kedro.core.training.batches import Batch, BatchSource, batch_weight
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.core.training.context import (
    STATE_FILE,
    MetricsSink,
    current_metrics_sink,
    current_state_folder,
    slug,
)
from warmup_distill_kedro.core.training.parallel import (
    allow_mixed_precision,
    broadcast_into,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    fill_deepspeed_config,
    shards_parameters,
)
from warmup_distill_kedro.core.training.rng import rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, Mapping[str, float]]]
EvalFn = Callable[[torch.nn.Module], Mapping[str, float]]


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
        # None: the sink the project's MLflow hook set around this node (context.set_metrics_sink), if any.
        self.metrics_sink = metrics_sink if metrics_sink is not None else current_metrics_sink()
        self.name = name
        allow_mixed_precision(config.mixed_precision)
        self.accelerator = Accelerator(
            cpu=config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        launched = os.environ.get("WORLD_SIZE")  # set by torchrun (accelerate launch) and DeepSpeed
        if launched and int(launched) != self.num_processes:  # each would train alone, on the same batches
            raise RuntimeError(
                f"{name}: launched as {launched} processes (WORLD_SIZE) but accelerate joined "
                f"{self.num_processes} ({self.accelerator.distributed_type.value}); was accelerate's state "
                "created earlier in this process without cpu=True on a machine without CUDA?"
            )
        seed_everything(config.seed)
        self._checkpointing = config.gradient_checkpointing and enable_gradient_checkpointing(model)
        # Default: every trainable parameter at the configured rate. A stage with parts that learn at
        # their own rate (DSKD's projectors) passes its groups; a group without "lr" gets the default.
        groups = [
            {**group, "params": list(group["params"])}
            for group in (
                parameter_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
            )
        ]
        # FSDP and DeepSpeed ZeRO-3 rewrite the module they shard: the loop trains a copy and writes its
        # full weights back into the caller's model (which other references, e.g. `eval_fn`, point at).
        self._caller_model = model
        self._shards = shards_parameters(self.accelerator)
        if self._shards:
            if getattr(data, "model", None) is not None:
                raise ValueError(
                    f"{name}: the data source samples from the model being trained, and under "
                    f"{self.accelerator.distributed_type.value} the loop trains a sharded copy of it; use DDP "
                    "(conf/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 for on-policy and adaptive sources"
                )
            model, groups = copy.deepcopy((model, groups))  # one memo: the groups point into the copy
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            fill_deepspeed_config(self.accelerator, config)
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
        # The loss runs inside the prepared module's forward, so that a loss reaching into the model (a head,
        # DSKD's projectors) still goes through DDP / FSDP / DeepSpeed, which sync gradients and gather
        # shards around that forward; `loss_fn` gets the plain model.
        self.prepared, self.optimizer = self.accelerator.prepare(_LossModule(model, loss_fn), optimizer)
        if self.accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
            raise ValueError(
                f"{name}: the accelerate config accumulates {self.accelerator.gradient_accumulation_steps} "
                f"micro-batches, training.gradient_accumulation_steps is {config.gradient_accumulation_steps}: "
                "set the DeepSpeed config's gradient_accumulation_steps to auto"
            )
        # Stepped by hand, once per optimizer step: accelerate's wrapper would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, config.warmup_steps, config.max_steps, config.min_lr_ratio),
        )
        self.step = 0
        self.data_position = 0  # batches of the data source consumed, over all processes
        self.history: list[dict[str, float]] = []
        self.final_eval: dict[str, float] = {}
        # One sub-folder per run name: a node may train more than once (DSKD pre-trains its projectors).
        root = Path(state_folder) if state_folder is not None else current_state_folder()
        self.state_file = root / slug(name) / STATE_FILE if root is not None else None
        partitioned = self._shards or self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.state_file is not None and partitioned:
            logger.warning(
                "%s: no resumable state under %s (each process holds part of the optimizer state; not "
                "supported): a crashed run starts over",
                name,
                self.accelerator.distributed_type.value,
            )
            self.state_file = None

    @property
    def module(self) -> torch.nn.Module:
        """The model being trained, without the wrappers (under FSDP / ZeRO-3: the sharded copy)."""
        return self.accelerator.unwrap_model(self.prepared).model

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole state of this process (DDP: the same on every process but the data source's)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data_position": self.data_position,
            "history": list(self.history),
            "final_eval": dict(self.final_eval),
            "rng": rng_state(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "num_processes": self.num_processes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.data_position = state["data_position"]
        self.history = list(state["history"])
        self.final_eval = dict(state.get("final_eval", {}))
        set_rng_state(state["rng"])
        data_state = state.get("data")
        by_process = state.get("data_by_process")
        if by_process is not None and len(by_process) == self.num_processes:
            data_state = by_process[self.process_index]  # each process's own source (its replay buffer)
        if data_state is not None:  # sources with state of their own (the adaptive replay buffer)
            self.data.load_state_dict(data_state)

    def save_state(self) -> None:
        """Write `state_dict()` to the state file atomically and durably: a crash or a power cut mid-write
        keeps the previous one (the data is synced before the rename, the folder after).

        Called on every process (the data sources' states are gathered); only the main one writes.
        """
        assert self.state_file is not None
        state = self.state_dict()
        if self.num_processes > 1 and state["data"] is not None:
            state["data_by_process"] = gather_object([state["data"]])
        if not self.accelerator.is_main_process:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(self.state_file)
        try:
            torch.save(state, partial)
            fsync_file(partial)
            os.replace(partial, self.state_file)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_dir(self.state_file.parent)

    def resume(self) -> bool:
        """Load the saved state when there is one; True when the run continues from it.

        The main process decides (whether the file exists); every process then loads it.
        """
        if self.state_file is None:
            return False
        found = self.state_file.is_file()
        if self.num_processes > 1:
            found = broadcast_object_list([found])[0]
        if not found:
            return False
        if not self.state_file.is_file():
            raise FileNotFoundError(
                f"{self.name}: process {self.process_index} cannot read the training state "
                f"{self.state_file} that the main process found: the processes of one run must share the "
                "project's data/ folder (one machine, or a shared filesystem)"
            )
        state = load_state_file(self.state_file, self.name)
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
        if self.num_processes > 1 and self.accelerator.is_main_process:
            logger.info(
                "%s: data parallel on %d processes (%s), %d examples per optimizer step",
                self.name,
                self.num_processes,
                self.accelerator.distributed_type.value,
                config.batch_size * self.num_processes * config.gradient_accumulation_steps,
            )
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
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")  # this process's loss
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                summary = _mean_metrics(window)
                summary["steps_per_second"] = len(window) / max(1e-9, time.perf_counter() - started)
                self._emit(self._mean_over_processes(summary))
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
            model=self.trained_model(), history=self.history, final_eval=self.final_eval, steps=self.step
        )

    def trained_model(self) -> torch.nn.Module:
        """The model with its trained weights, as a plain module (no DDP or mixed-precision wrapper).

        Under FSDP / ZeRO-3 a collective: call it on every process.
        """
        if self._shards:
            return self._sync_caller_model()
        model = self.accelerator.unwrap_model(self.prepared, keep_fp32_wrapper=False).model
        if self._checkpointing:
            disable_gradient_checkpointing(model)
        return model

    def _optimizer_step(self) -> dict[str, float]:
        config = self.config
        accelerator = self.accelerator
        self.prepared.train()
        # accelerate counts micro-batches per Accelerator, but how many to accumulate lives in a state shared
        # by every Accelerator of the process (a singleton): set it for this run before every step.
        accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
        if hasattr(self.data, "begin_step"):  # a source whose mix follows training progress (DistiLLM's)
            self.data.begin_step(self.step, config.max_steps)
        # The step's micro-batches first: each one's loss is a mean over its own tokens, and is weighted by
        # its share of the tokens of the whole step, over every process, so that the gradient is the
        # step's token mean however the batch is cut (accumulation, processes).
        positions = [
            self.data_position + k * self.num_processes + self.process_index
            for k in range(config.gradient_accumulation_steps)
        ]
        batches = [{k: v.to(accelerator.device) for k, v in self.data.batch(p).items()} for p in positions]
        weights = [batch_weight(batch) for batch in batches]
        step_weight = self._sum_over_processes(sum(weights))
        shares = config.gradient_accumulation_steps * self.num_processes / max(step_weight, 1.0)
        accumulated: list[Mapping[str, float]] = []
        for position, batch, weight in zip(positions, batches, weights, strict=True):
            # accumulate(): no gradient sync but on the last micro-batch (DDP no_sync, FSDP, DeepSpeed).
            with accelerator.accumulate(self.prepared), accelerator.autocast():
                loss, loss_metrics = self.prepared(batch)
                self._check_finite(loss, position)
                # backward divides by the micro-batches accumulated and DDP averages over processes: the
                # weight times their number turns both into this batch's share of the step's tokens.
                accelerator.backward(loss * (weight * shares))
            accumulated.append({"loss": loss.item(), **loss_metrics})
            self.data_position += self.num_processes
        clipping: dict[str, float] = {}
        if config.max_grad_norm is not None:
            norm = accelerator.clip_grad_norm_(self.prepared.parameters(), config.max_grad_norm)
            if norm is not None:
                clipping["grad_norm"] = float(norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = _mean_metrics(accumulated)
        if len(accumulated) > 1:  # the loss the step optimized: its micro-batches weighted by their tokens
            metrics["loss"] = sum(m["loss"] * w for m, w in zip(accumulated, weights, strict=True)) / max(
                sum(weights), 1
            )
        return {**metrics, "learning_rate": lr, **clipping}

    def _sum_over_processes(self, value: float) -> float:
        """A number summed over the run's processes (itself with one process: no collective)."""
        if self.num_processes == 1:
            return float(value)
        total = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(total, reduction="sum").item())

    def _check_finite(self, loss: torch.Tensor, position: int) -> None:
        """Raise on a non-finite loss, on every process at once (one that raised alone would leave the
        others waiting in the gradient all-reduce)."""
        finite = bool(torch.isfinite(loss))
        failing = 0 if finite else 1
        if self.num_processes > 1:
            flag = torch.tensor([float(failing)], device=self.accelerator.device)
            failing = int(self.accelerator.reduce(flag, reduction="sum").item())
        if failing:
            what = f"{loss.item()}"
            if self.num_processes > 1:
                what = f"on {failing} of {self.num_processes} processes (this one: {loss.item()})"
            raise NonFiniteLossError(
                f"{self.name}: non-finite loss {what} at optimizer step {self.step + 1}, "
                f"micro-batch {position} (epoch position of the data source)"
            )

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each key's mean over the processes that report it (a no-op for one process)."""
        if self.num_processes == 1:
            return metrics
        records = gather_object([metrics])
        return _mean_metrics(records)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Run `eval_fn` on every process (same weights, same result: no process waits for another, and
        a source that adapts to the validation loss sees it everywhere); the main one reports it."""
        assert self.eval_fn is not None
        if self._shards:
            model = self._sync_caller_model()
        else:
            model = self.module
        model.eval()
        metrics = {f"eval/{k}": float(v) for k, v in self.eval_fn(model).items()}
        self._emit(metrics)
        return metrics

    def _sync_caller_model(self) -> torch.nn.Module:
        """FSDP / ZeRO-3: the full weights of the trained copy, written into the caller's model on every
        process (on this process's device). A collective."""
        full = self.accelerator.get_state_dict(self.prepared)  # whole on the main process only
        prefix = f"{_LossModule.MODEL}."
        main = self.accelerator.is_main_process
        full = {k.removeprefix(prefix): v for k, v in full.items()} if main else {}
        target = self._caller_model.to(self.accelerator.device)
        broadcast_into(target, full, self.accelerator)
        return target

    def _emit(self, metrics: Mapping[str, float]) -> None:
        record = {"step": float(self.step), **metrics}
        self.history.append(record)
        if self.metrics_sink is not None and self.accelerator.is_main_process:
            self.metrics_sink(metrics, self.step)


class UnsafeStateError(RuntimeError):
    """A training state file holds something other than tensors and plain values."""


def load_state_file(path: Path, name: str = "train") -> dict[str, Any]:
    """A saved training state, read with `weights_only=True`: tensors, numbers, strings and containers.

    Resuming is automatic, and a state folder may be writable by others (a shared filesystem): a file
    that holds any other object (which unpickling would construct, running code it names) is refused.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises loading it anyway or allow-listing what it found; keep only the name.
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise UnsafeStateError(
            f"{name}: refusing to resume from the training state {path}: it holds objects other than tensors "
            f"and plain values{f' (it names {found[1]})' if found else ''}, so it was not written by this code's "
            f"save_state (another version, or someone else). It was not loaded; delete the file to start "
            "this training over"
        ) from None


class _LossModule(torch.nn.Module):
    """`loss_fn(model, batch)` as the forward of a module holding the model: what `prepare` wraps."""

    MODEL = "model"

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Mapping[str, float]]:
        return self.loss_fn(self.model, batch)


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
