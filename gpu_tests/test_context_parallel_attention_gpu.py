"""The context-parallel attention's CUDA blocks (models/kernels/context_parallel_attention.py: flash
attention with its log-sum-exp, bf16; packed rows: torch's varlen flash kernels in bf16, the
memory-efficient kernel under each block's segment mask in fp32) on one GPU: cp ranks emulated by
running each rank's ring steps (or gathered prefix) one after another, as
tests/unit/test_context_parallel_attention.py does on CPU. Both the split blocks and the unsplit bf16
kernel are measured against fp32 attention of the whole sequence; the blocks may be at most twice as
far from it as the unsplit flash kernel (bf16 tolerance: the blocks round their partial outputs and
add their gradient terms in another order). Packed rows: the blocks against fp32 block-diagonal
attention of the whole stream, relative error within 1e-2 (bf16) or 1e-4 (fp32); one varlen block
(square causal and full segments, one-row segments among them) against fp32 attention under its
segment mask."""
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


LENGTHS = {
    "docs": [700, 3, 1025, 96, 1, 513, 250],  # most not multiples of 2·cp: the split pads them
    # every document one chunk a rank: the second-half blocks' segments are one row each (the
    # flash kernel's single-query grouped-query path)
    "tiny": [1, 3, 4, 2, 8, 5, 1, 7],
}


@pytest.mark.parametrize("documents", list(LENGTHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["ring", "allgather"])
@pytest.mark.parametrize("cp", [2, 4])
def test_packed_blocks_match_block_diagonal_attention(mode, cp, dtype, documents):
    from models.kernels.attention import block_causal_mask

    torch.manual_seed(cp)
    heads, kv_heads, d = 32, 8, 128
    lengths = LENGTHS[documents]
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


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_block_matches_masked_attention(causal):
    """One packed block through the varlen flash kernels (bf16, grouped-query) against fp32 attention
    under its segment mask: output, LSE and the gradients of the kernel's backward given them."""
    from models.kernels import context_parallel_attention as cpa

    torch.manual_seed(0)
    heads, kv_heads, d, scale = 16, 4, 128, 128 ** -0.5
    q_lengths = torch.tensor([300, 1, 77, 512, 2])
    k_lengths = q_lengths if causal else torch.tensor([150, 9, 1, 1024, 3])
    block = cpa._varlen_block(slice(None), slice(None), causal, q_lengths, k_lengths, torch.device("cuda"))
    rows, keys = int(q_lengths.sum()), int(k_lengths.sum())
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
               for h, n in ((heads, rows), (kv_heads, keys), (kv_heads, keys)))
    dout = torch.randn(1, heads, rows, d, device="cuda", dtype=torch.bfloat16)
    out, lse = cpa.block_forward(q, k, v, block, scale)
    dq, dk, dv = cpa.block_backward(dout, q, k, v, out, lse, block, scale)

    mask = cpa.segment_mask(block, torch.float32) == 0
    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=scale, enable_gqa=True)
    ref.backward(dout.float())
    scores = (q32.detach() @ k32.detach().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)) * scale
    ref_lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    assert out.shape == q.shape and lse.shape == (1, heads, rows) and lse.dtype == torch.float32
    assert (lse - ref_lse).abs().max().item() < 2e-2
    for name, got, want in (("out", out, ref), ("dq", dq, q32.grad), ("dk", dk, k32.grad), ("dv", dv, v32.grad)):
        assert got.shape == want.shape, name
        error = ((got.float() - want).norm() / want.norm()).item()
        assert error < 1e-2, f"{name}: relative error {error:.2e}"
