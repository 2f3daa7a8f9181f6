"""Data for the training loop, addressed by position so that a run resumes exactly where it stopped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """Data for the loop, addressed by position so that a run can resume exactly where it stopped.

    A source may also have `begin_step(step, max_steps)`, called before each optimizer step (a mix that
    follows training progress), and `state_dict()` / `load_state_dict()` (state of its own, saved with
    the run's).
    """

    def batch(self, position: int) -> Batch: ...


def batch_weight(batch: Batch) -> int:
    """What a batch's loss is a mean over, counted before the forward: its response tokens (the positions
    whose next label counts), or for a batch without `labels` (preference pairs) its rows."""
    labels = batch.get("labels")
    if labels is None:
        return int(next(iter(batch.values())).shape[0])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


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
