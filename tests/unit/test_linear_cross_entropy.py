"""Fused output layer + cross entropy (models/kernels/linear_cross_entropy.py) against the
unfused reference: logits = h Wᵀ, torch cross entropy, autograd (fp32, 1e-5); linear_token_losses
under a loss that weighs every token differently (as a preference objective does). The model's loss
through it is tests/dist/test_fused_loss_model.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels.linear_cross_entropy import CHUNK_TOKENS, linear_cross_entropy, linear_token_losses


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


def test_default_chunks_split_a_long_row():
    """Without chunk_tokens, 3000 tokens run as CHUNK_TOKENS (2048) + 952, against an fp64
    reference within 1e-5 of each result's largest value."""
    vocab, tokens = 2**13, 1000
    assert CHUNK_TOKENS < 3 * tokens < 2 * CHUNK_TOKENS
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, tokens, 32, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (3, tokens), generator=g)
    mask = (torch.rand(3, tokens, generator=g) > 0.25).float()

    losses = linear_cross_entropy(hidden, weight, labels, mask)
    (losses * mask).sum().mul(0.5).backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).reshape(-1, vocab), labels.reshape(-1), reduction="none").reshape(3, tokens)
    (ref * mask.double()).sum().mul(0.5).backward()
    for a, b in zip((losses.detach(), hidden.grad, weight.grad), (ref.detach(), h64.grad, w64.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("chunk", [7, 1000], ids=["chunks", "one-chunk"])
def test_token_losses_take_any_gradient_per_token(chunk):
    """Each token's loss weighted by its own factor (signs and sizes differ, as a DPO pair's sides
    do): losses and both gradients equal the unfused reference's; linear_cross_entropy's single
    scale would not."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 19, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (4, 19), generator=g)
    weights = torch.randn(4, 19, generator=g) * (torch.rand(4, 19, generator=g) > 0.2)

    losses = linear_token_losses(hidden, weight, labels, chunk_tokens=chunk)
    (losses * weights).sum().backward()
    got = (losses.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    ref = F.cross_entropy((hidden @ weight.t()).reshape(-1, 300), labels.reshape(-1), reduction="none").reshape(4, 19)
    (ref * weights).sum().backward()
    for a, b in zip(got, (ref.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))  # fp32: error scales with the tensor
    want_hidden = hidden.grad.clone()
    hidden.grad = None
    single_scale = linear_cross_entropy(hidden, weight, labels, torch.ones(4, 19), chunk_tokens=chunk)
    (single_scale * weights).sum().backward()
    assert not torch.allclose(hidden.grad, want_hidden, rtol=1e-2, atol=1e-3)
