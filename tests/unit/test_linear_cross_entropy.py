"""Fused output layer + cross entropy (models/kernels/linear_cross_entropy.py) against the
unfused reference: logits = h Wᵀ, torch cross entropy, autograd (fp32, 1e-5). The model's loss
through it is tests/dist/test_fused_loss_model.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels.linear_cross_entropy import chunk_tokens_for, linear_cross_entropy


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


def test_default_chunks_follow_the_vocab():
    """Without chunk_tokens a 128k vocab runs 256-token chunks: 300 tokens as 256 + 44. Against an
    fp64 reference (over 128k logits torch's own fp32 path is 4x further from it than this one),
    within 1e-5 of each result's largest value."""
    vocab = 2**17
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 100, 32, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 100), generator=g)
    mask = (torch.rand(3, 100, generator=g) > 0.25).float()
    assert chunk_tokens_for(vocab) == 256

    losses = linear_cross_entropy(hidden, weight, labels, mask)
    (losses * mask).sum().mul(0.5).backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).reshape(-1, vocab), labels.reshape(-1), reduction="none").reshape(3, 100)
    (ref * mask.double()).sum().mul(0.5).backward()
    for a, b in zip((losses.detach(), hidden.grad, weight.grad), (ref.detach(), h64.grad, w64.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
