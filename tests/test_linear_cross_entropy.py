"""Fused output layer + cross entropy (models/kernels/linear_cross_entropy.py) against the
unfused reference: logits = h Wᵀ, torch cross entropy, autograd (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from models.kernels.linear_cross_entropy import linear_cross_entropy


@pytest.mark.parametrize("chunk", [7, 64, 1000], ids=["chunks", "one-chunk-exact", "one-chunk"])
def test_matches_logits_then_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 32, generator=g, requires_grad=True)
    weight = torch.randn(500, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 500, (3, 21), generator=g)
    mask = (torch.rand(3, 21, generator=g) > 0.25).float()

    losses = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=chunk)
    (losses * mask).sum().mul(0.5).backward()
    got = (losses.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    ref = F.cross_entropy((hidden @ weight.t()).reshape(-1, 500), labels.reshape(-1), reduction="none").reshape(3, 21)
    (ref * mask).sum().mul(0.5).backward()
    for a, b in zip(got, (ref.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_fused_loss_matches_megatron_loss():
    assert "FUSED LOSS OK" in run_cli("tests.scripts.fused_loss_model", []).stdout
