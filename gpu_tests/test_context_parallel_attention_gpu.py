"""The context-parallel attention's CUDA blocks (models/kernels/context_parallel_attention.py: flash
attention with its log-sum-exp, bf16; packed rows: the memory-efficient kernel under the
per-document mask, bf16 and fp32) on one GPU: cp ranks emulated by running each rank's ring
steps (or gathered prefix) one after another, as tests/unit/test_context_parallel_attention.py does
on CPU. Both the split blocks and the unsplit bf16 kernel are measured against fp32 attention of the
whole sequence; the blocks may be at most twice as far from it as the unsplit flash kernel (bf16 tolerance:
the blocks round their partial outputs and add their gradient terms in another order). Packed rows:
the blocks against fp32 block-diagonal attention of the whole stream, relative error within 1e-2 (bf16)
or 1e-4 (fp32)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "unit"))
from test_context_parallel_attention import _emulate, _emulate_packed  # noqa: E402

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
    q1, k1, v1 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    # the kernel the blocks run (SDPA's own choice may be another: cuDNN's, with other rounding)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        unsplit = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, scale=scale, enable_gqa=True)
    unsplit.backward(dout)

    def error(got, want):
        return ((got.float() - want.float()).norm() / want.float().norm()).item()

    for name, got, kernel, want in (("out", out, unsplit, ref), ("dq", dq, q1.grad, q.grad),
                                    ("dk", dk, k1.grad, k.grad), ("dv", dv, v1.grad, v.grad)):
        ours, theirs = error(got, want), error(kernel, want)
        print(f"cp={cp} {mode} {name}: blocks {ours:.2e}, unsplit kernel {theirs:.2e}")
        assert ours <= max(2 * theirs, 1e-3), f"{name}: relative error {ours:.2e}, unsplit kernel's {theirs:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["ring", "allgather"])
@pytest.mark.parametrize("cp", [2, 4])
def test_packed_blocks_match_block_diagonal_attention(mode, cp, dtype):
    from models.kernels.attention import block_causal_mask

    torch.manual_seed(cp)
    heads, kv_heads, d = 32, 8, 128
    lengths = [700, 3, 1025, 96, 1, 513, 250]  # most not multiples of 2·cp: the split pads them
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, h, total, d, device="cuda", dtype=dtype, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(1, heads, total, d, device="cuda", dtype=dtype)
    scale = d ** -0.5
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=block_causal_mask(cu, total, "cuda"),
                                         scale=scale, enable_gqa=True)
    ref.backward(dout.float())
    with torch.no_grad():
        out, dq, dk, dv = _emulate_packed(mode, q, k, v, dout, cu, cp, scale)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    # relative norm errors: a largest absolute one is half a bf16 ulp of the largest output (a
    # one-token document's output is its value row) before any error of the blocks
    for name, got, want in (("out", out, ref), ("dq", dq, q.grad), ("dk", dk, k.grad), ("dv", dv, v.grad)):
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert error < tolerance, f"{name}: relative error {error:.2e}"
