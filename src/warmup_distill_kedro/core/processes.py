"""The processes of one run (`accelerate launch`, torchrun, DeepSpeed and MPI launchers): this process's
rank and their number, joining their group, and, for code outside the training loop, which share of the
items this process handles and every process's results gathered back in order. With one process every
call is a no-op.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch

T = TypeVar("T")

_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
_WORLD_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")


def _int_from_environment(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def process_rank_and_count() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's once joined, else what the launcher put
    in the environment (so that hooks need no group); (0, 1) when not launched on several processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return _int_from_environment(_RANK_VARIABLES, 0), _int_from_environment(_WORLD_VARIABLES, 1)


def is_main_process() -> bool:
    return process_rank_and_count()[0] == 0


def join_launched_processes() -> None:
    """Join the process group a launcher described (several processes in the environment) if this
    process has not joined it yet; a collective, like the calls that need it.

    The probe and check stages may run before any training node has started the group (the
    `from_checkpoints` pipeline begins with them). accelerate's `PartialState` joins it the way the
    training loop's Accelerator will find it (gloo on CPU, NCCL with the process's GPU set).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if process_rank_and_count()[1] <= 1:
        return
    from accelerate import PartialState

    # Without `cpu=True` on a machine without CUDA accelerate would not join the group at all (distributed
    # type NO), and the training loop's Accelerator, created later, would inherit that state.
    PartialState(cpu=not torch.cuda.is_available())


def process_share(n_items: int, across_processes: bool) -> list[int]:
    """The item indices this process handles: all of them, or with `across_processes` and several
    processes (the launcher's group joined first), every world-size-th one from its rank (round-robin
    keeps long and short batches mixed)."""
    if not across_processes:
        return list(range(n_items))
    join_launched_processes()
    rank, world = process_rank_and_count()
    return list(range(rank, n_items, world))


def gather_in_order(results: list[T | None], across_processes: bool) -> list[T]:
    """Every process's filled slots merged into one full list on every process (a collective when
    `across_processes` and several processes); the slots keep their indices, so the order is the input's."""
    _, world = process_rank_and_count()
    if across_processes and world > 1:
        mine = [(i, r) for i, r in enumerate(results) if r is not None]
        parts: list[list[tuple[int, T]] | None] = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        for part in parts:
            for i, r in part or []:
                results[i] = r
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"{len(missing)} results missing after generation (first: index {missing[0]})")
    return [r for r in results if r is not None]
