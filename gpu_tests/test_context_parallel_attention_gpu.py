"""The context-parallel attention's CUDA blocks (models/kernels/context_parallel_attention.py: flash
attention with its log-sum-exp, bf16) on one GPU: cp ranks emulated by running each rank's ring
steps (or gathered prefix) one after another, as tests/unit/test_context_parallel_attention.py does
on CPU, against dense causal SDPA of the whole sequence in fp32. bf16 tolerance 1e-2: elementwise
for the output, relative to the norm for the gradients (blocks add their bf16 terms in another order)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "unit"))
from test_context_parallel_attention import _emulate  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


@pytest.mark.parametrize("mode", ["ring", "allgather"])
@pytest.mark.parametrize("cp", [2, 4])
def test_blocks_match_unsplit_attention(mode, cp):
    torch.manual_seed(cp)
    b, heads, kv_heads, d = 1, 32, 8, 128
    s = 2 * cp * 512
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(b, heads, s, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale,
                                         enable_gqa=True)
    ref.backward(dout.float())
    with torch.no_grad():
        out, dq, dk, dv = _emulate(mode, q, k, v, dout, cp, scale)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)
    for name, got, want in (("dq", dq, q.grad), ("dk", dk, k.grad), ("dv", dv, v.grad)):
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert error < 1e-2, f"{name}: relative error {error:.2e}"
