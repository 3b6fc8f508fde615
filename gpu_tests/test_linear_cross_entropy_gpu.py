"""The fused output layer + cross entropy on the GPU (compiled softmax-gradient kernel, bf16)
against logits + cross entropy computed in fp32 from the same bf16 inputs: losses and
gradients within 1e-2 relative to their norm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels.linear_cross_entropy import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fused_linear_cross_entropy_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 1536, 512, device="cuda", generator=g).mul(0.5).bfloat16().requires_grad_()
    weight = torch.randn(32000, 512, device="cuda", generator=g).mul(0.05).bfloat16().requires_grad_()
    labels = torch.randint(0, 32000, (2, 1536), device="cuda", generator=g)
    mask = (torch.rand(2, 1536, device="cuda", generator=g) > 0.2).float()

    losses = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=1024)
    (losses * mask).sum().backward()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = F.cross_entropy((h32 @ w32.t()).reshape(-1, 32000), labels.reshape(-1), reduction="none").reshape(2, 1536)
    (ref * mask).sum().backward()
    assert _rel(losses, ref) < 1e-2
    assert _rel(hidden.grad, h32.grad) < 1e-2
    assert _rel(weight.grad, w32.grad) < 1e-2
