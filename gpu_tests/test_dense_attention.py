"""The dense core attention's CUDA path (models/kernels/attention.dense_attention: cuDNN first in the
SDPA backend order) against fp32 attention, next to the flash kernel alone: bf16 output and input
gradients may be at most twice as far from fp32 as flash's (or 1e-3 relative)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.kernels.attention import dense_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("seq", [1000, 4096])
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 16, 64), (32, 8, 128)], ids=["mha64", "gqa128"])
def test_cuda_attention_matches_fp32(seq, heads, kv_heads, dim):
    torch.manual_seed(seq)
    q, k, v = (torch.randn(2, h, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(2, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    gqa = heads != kv_heads
    scale = dim ** -0.5

    def run(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out, *(x.grad for x in leaves)]

    want = run(lambda a, b, c: F.scaled_dot_product_attention(a.float(), b.float(), c.float(), is_causal=True,
                                                              scale=scale, enable_gqa=gqa))
    got = run(lambda a, b, c: dense_attention(a, b, c, None, True, scale, 0.0, gqa))

    def flash(a, b, c):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale, enable_gqa=gqa)

    baseline = run(flash)
    for name, g, f, w in zip(("out", "dq", "dk", "dv"), got, baseline, want):
        ours, theirs = _error(g, w), _error(f, w)
        print(f"seq {seq} {heads}/{kv_heads}x{dim} {name}: cuDNN-first {ours:.2e}, flash {theirs:.2e}")
        assert ours <= max(2 * theirs, 1e-3), f"{name}: relative error {ours:.2e}, flash's {theirs:.2e}"
