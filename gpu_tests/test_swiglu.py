"""models/kernels/swiglu.py: the Triton SwiGLU backward against autograd through the unfused
silu(gate) * up (fp32 1e-5, bf16 1e-2), the forward written into a given tensor (the mlp_act
recompute) against silu(gate) * up, and both inside megatron's SwiGLUFunction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels.swiglu import swiglu_back, swiglu_into, use_triton_swiglu

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


def test_megatron_swiglu_function_uses_it():
    from megatron.core.fusions.fused_bias_swiglu import SwiGLUFunction

    use_triton_swiglu()
    g = torch.Generator(device="cuda").manual_seed(1)
    y = (torch.randn(256, 2, 2 * 4096, device="cuda", generator=g) * 3).bfloat16().requires_grad_(True)
    grad = torch.randn(256, 2, 4096, device="cuda", generator=g).bfloat16()
    out = SwiGLUFunction.apply(y, False, False)
    gate, up = torch.chunk(y.detach().float(), 2, -1)
    torch.testing.assert_close(out.float(), F.silu(gate) * up, rtol=1e-2, atol=1e-2)
    out.backward(grad)
    torch.testing.assert_close(y.grad.float(), _reference(y, grad), rtol=1e-2, atol=1e-2)
