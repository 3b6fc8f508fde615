"""Fused output layer + cross entropy (models/kernels/linear_cross_entropy.py) against the
unfused reference: logits = h Wᵀ, torch cross entropy, autograd (in fp64; fp32 results within 1e-5
of the largest value)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from models.kernels.linear_cross_entropy import linear_cross_entropy


@pytest.mark.parametrize("chunk,vocab,seq", [(7, 500, 21), (63, 500, 21), (1000, 500, 21), (None, 2**17, 100)],
                         ids=["chunks", "one-chunk-exact", "one-chunk", "default-by-vocab"])
def test_matches_logits_then_cross_entropy(chunk, vocab, seq):
    """(default-by-vocab: a 128k vocab's chunks are 256 tokens, so 300 tokens run as 256 + 44)"""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, seq, 32, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (3, seq), generator=g)
    mask = (torch.rand(3, seq, generator=g) > 0.25).float()

    losses = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=chunk)
    (losses * mask).sum().mul(0.5).backward()
    got = (losses.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    # the reference in fp64: over a 128k vocab torch's own fp32 path is 4x further from it than ours
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).reshape(-1, vocab), labels.reshape(-1), reduction="none").reshape(3, seq)
    (ref * mask.double()).sum().mul(0.5).backward()
    for a, b in zip(got, (ref.detach(), h64.grad, w64.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_model_fused_loss_matches_megatron_loss():
    assert "FUSED LOSS OK" in run_cli("tests.scripts.fused_loss_model", []).stdout
