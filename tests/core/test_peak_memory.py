"""benchmarks/peak_memory.py: the CPU replay of the profiler's allocation events on known cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peak_memory import peak_memory  # noqa: E402

MB = 1000 * 1000


def test_one_tensor_made_and_dropped():
    measured = peak_memory(lambda: float(torch.ones(1000, 1000).sum()))  # 4 MB of float32
    assert 4 * MB <= measured.peak_bytes < 4 * MB + 4096
    assert measured.retained_bytes < 4096  # freed before the end
    assert measured.result == 1e6


def test_two_live_at_once_and_what_is_kept():
    def fn():
        a = torch.ones(1000, 1000)
        b = torch.ones(500, 1000)  # both alive: 6 MB
        del a, b
        return torch.ones(250, 1000)  # 1 MB kept by the result

    measured = peak_memory(fn)
    assert 6 * MB <= measured.peak_bytes < 6 * MB + 4096
    assert MB <= measured.retained_bytes < MB + 4096
    assert measured.result.shape == (250, 1000)


def test_inputs_are_the_baseline_and_backward_is_seen():
    x = torch.randn(1000, 1000, requires_grad=True)  # allocated before: not counted

    def fn():
        (x.exp() * 2).sum().backward()  # exp saved for backward (4 MB), its product (4 MB), then x.grad

    measured = peak_memory(fn)
    assert 8 * MB <= measured.peak_bytes < 16 * MB
    assert 4 * MB <= measured.retained_bytes < 4 * MB + 4096  # x.grad
    assert x.grad is not None


def test_refuses_other_devices():
    with pytest.raises(ValueError, match="cpu or cuda"):
        peak_memory(lambda: None, device="meta")
