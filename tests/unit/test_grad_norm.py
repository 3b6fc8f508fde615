"""parallel/grad_norm.py: the norm of grads that are views of one buffer, against the fp64 norm
of the same values copied out one by one."""
from __future__ import annotations

import pytest
import torch

from parallel import grad_norm


def _reference(tensors: list[torch.Tensor]) -> float:
    return torch.cat([t.detach().double().flatten() for t in tensors]).norm().item()


def _buffer(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("ranges", [
    [(0, 1000), (1024, 3000), (3072, 9000)],  # alignment gaps, as megatron pads each param's start
    [(0, 5000), (5100, 10000)],  # a grad left out of the norm between two that count
    [(0, 1000), (6000, 7000)],  # gaps too large to read: the multi-tensor path
], ids=["padding", "left-out-grad", "sparse"])
def test_views_of_one_buffer(ranges):
    buffer = _buffer(10_000)
    views = [buffer[a:b].view(-1, 10) if (b - a) % 10 == 0 else buffer[a:b] for a, b in ranges]
    got = grad_norm.l2_norm(views, torch.float64)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_reference(views), rel=1e-12)


def test_unordered_views_and_separate_tensors():
    buffer = _buffer(4000)
    views = [buffer[2000:4000], buffer[0:1990]]  # megatron lists params in reverse buffer order
    assert grad_norm.l2_norm(views, torch.float64).item() == pytest.approx(_reference(views), rel=1e-12)
    separate = [torch.randn(300), torch.randn(7, 11)]
    assert grad_norm.l2_norm(separate, torch.float64).item() == pytest.approx(_reference(separate), rel=1e-12)


def test_bf16_grads_accumulate_in_fp32():
    buffer = _buffer(50_000, torch.bfloat16)
    views = [buffer[0:20_000], buffer[20_032:50_000]]
    got = grad_norm.l2_norm(views, torch.float32)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference(views), rel=2e-5)  # (CPU's fp32 sum of 50k squares drifts a few 1e-6)


def test_tiling_views_take_one_pass(monkeypatch):
    calls = []
    original = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or original(ts, *a, **k))
    buffer = _buffer(8192)
    views = [buffer[i:i + 1008] for i in range(0, 8192, 1024)]
    assert grad_norm.l2_norm(views, torch.float64).item() == pytest.approx(_reference(views), rel=1e-12)
    assert calls == [len(views) - 1]  # only the 16-element gaps go through the multi-tensor norm
    calls.clear()
    grad_norm.l2_norm([buffer[0:4096], buffer[4096:8192]], torch.float64)
    assert calls == []  # no gaps at all: a single vector_norm
