"""Peak memory a callable allocates above what was allocated when it started, on CPU or CUDA.

CUDA has the caching allocator's counters (`torch.cuda.max_memory_allocated`). CPU torch keeps none, so
on CPU the callable runs under `torch.profiler` with `profile_memory=True`, which records every
allocation and free of torch's CPU allocator (size, time, thread), also those made inside an operator
and never returned (workspaces, autograd's buffers in backward); replaying them in time order, the
largest running sum is the peak. Memory allocated before the call (the inputs) is the baseline and not
counted; freeing some of it during the call lowers the running sum below 0, as it does the real usage.

Only torch's allocator is seen: Python objects, NumPy arrays and the allocator caches of other
libraries are not. The profiler slows operator-heavy code down, so time a callable in a separate run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PeakMemory:
    """What `peak_memory` measured: bytes above the allocation level at the call's start."""

    peak_bytes: int  # the highest level reached during the call
    retained_bytes: int  # the level at its end (what its results and side effects, e.g. .grad, still hold)
    device: str
    result: Any = None  # what the callable returned

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> PeakMemory:
    """Run `fn()` once and return the peak bytes it allocated on `device` above the level at its start."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures cpu or cuda, not {device.type}")
    return _cpu_peak(fn)


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> PeakMemory:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    retained = torch.cuda.memory_allocated(device) - baseline
    return PeakMemory(peak, retained, str(device), result)


def _cpu_peak(fn: Callable[[], Any]) -> PeakMemory:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    events: list[tuple[int, int]] = []  # (time, signed bytes): + allocation, - free
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda event: (event[0], -event[1]))  # a tie counts the allocation first: never low
    level = peak = 0
    for _, size in events:
        level += size
        peak = max(peak, level)
    return PeakMemory(peak, level, "cpu", result)
