"""models/kernels/swiglu.py: the Triton SwiGLU backward against autograd through the unfused
silu(gate) * up (fp32 1e-5, bf16 1e-2), the forward written into a given tensor (the mlp_act
recompute) against silu(gate) * up, both through `swiglu` (megatron's bias-free SwiGLU on the
kernels), and the MLP the provider names on GPU against megatron's MLP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels.swiglu import swiglu, swiglu_back, swiglu_into

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _reference(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    y = y.detach().float().requires_grad_(True)
    gate, up = torch.chunk(y, 2, -1)
    (F.silu(gate) * up).backward(g.float())
    return y.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(512, 2, 8192), (37, 3, 1000)], ids=["bench", "ragged"])
def test_swiglu_back_matches_autograd(dtype, tol, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    *lead, ffn = shape
    y = torch.randn(*lead, 2 * ffn, device="cuda", generator=g).to(dtype) * 3
    grad = torch.randn(*lead, ffn, device="cuda", generator=g).to(dtype)
    torch.testing.assert_close(swiglu_back(grad, y).float(), _reference(y, grad), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(512, 2, 8192), (37, 3, 1000)], ids=["bench", "ragged"])
def test_swiglu_into_matches_unfused(dtype, tol, shape):
    g = torch.Generator(device="cuda").manual_seed(2)
    *lead, ffn = shape
    y = torch.randn(*lead, 2 * ffn, device="cuda", generator=g).to(dtype) * 3
    out = torch.full((*lead, ffn), float("nan"), device="cuda", dtype=dtype)
    swiglu_into(y, out)
    gate, up = torch.chunk(y.float(), 2, -1)
    torch.testing.assert_close(out.float(), F.silu(gate) * up, rtol=tol, atol=tol)


def test_swiglu_function_matches_megatrons():
    """`swiglu` against autograd through the unfused function and against megatron's own fused
    SwiGLU (bias_swiglu_impl, what megatron's MLP calls), forward and backward, bf16."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    g = torch.Generator(device="cuda").manual_seed(1)
    y = (torch.randn(256, 2, 2 * 4096, device="cuda", generator=g) * 3).bfloat16().requires_grad_(True)
    grad = torch.randn(256, 2, 4096, device="cuda", generator=g).bfloat16()
    out = swiglu(y)
    gate, up = torch.chunk(y.detach().float(), 2, -1)
    torch.testing.assert_close(out.float(), F.silu(gate) * up, rtol=1e-2, atol=1e-2)
    (dy,) = torch.autograd.grad(out, y, grad)
    torch.testing.assert_close(dy.float(), _reference(y, grad), rtol=1e-2, atol=1e-2)
    theirs = bias_swiglu_impl(y, None)
    (their_dy,) = torch.autograd.grad(theirs, y, grad)
    torch.testing.assert_close(out.float(), theirs.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dy.float(), their_dy.float(), rtol=1e-2, atol=1e-2)


def test_provider_mlp_runs_the_kernels_and_matches_megatrons_mlp(build_engine, monkeypatch):
    """The engine's dense MLP on GPU (TritonSwiGLUMLP) calls the kernels' SwiGLU and gives megatron's
    MLP forward's output and gradients on the same module (fp32: 1e-5)."""
    from megatron.core.transformer.mlp import MLP

    from models.kernels import swiglu as kernels
    from models.swiglu_mlp import TritonSwiGLUMLP

    args, engine = build_engine("tiny", seed=3, seq_length=128, micro_batch_size=2, params_dtype=torch.float32)
    mlp = engine.chunks[0].module.decoder.layers[0].mlp
    assert type(mlp) is TritonSwiGLUMLP
    calls = []
    apply = kernels.SwiGLUFunction.apply
    monkeypatch.setattr(kernels.SwiGLUFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(128, 2, args.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for forward in (TritonSwiGLUMLP.forward, MLP.forward):
        h = x.clone().requires_grad_()
        out, _ = forward(mlp, h)
        results.append((out, *torch.autograd.grad(out, [h, mlp.linear_fc1.weight], torch.ones_like(out))))
    assert len(calls) == 1
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
