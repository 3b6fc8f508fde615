"""GPU-only kernel checks (run on the GPU machine: `python -m pytest -q gpu_tests`; CI has no GPU).

Packed THD attention on CUDA goes through torch's varlen_attn; the reference is each document
alone through dense causal SDPA in fp32. bf16 tolerance 1e-2: elementwise for the output, relative
to the norm for the input gradients (under GQA a key/value gradient sums several heads' bf16
terms, so single elements stray further than one head's rounding).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels.attention import _varlen_causal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _reference(q, k, v, cu: list[int]) -> torch.Tensor:
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):  # [t, h, d] -> [1, h, t, d], causal within the document only
        qd, kd, vd = (x[a:b].float().transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=qd.size(1) != kd.size(1))
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (32, 8)], ids=["mha", "gqa"])
def test_varlen_matches_per_document_sdpa(heads, kv_heads):
    torch.manual_seed(0)
    lengths = [1, 37, 512, 5, 1000, 241]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    t, d = cu[-1], 64
    q = torch.randn(t, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, kv_heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, kv_heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu_t = torch.tensor(cu, device="cuda", dtype=torch.int32)
    out = _varlen_causal(q, k, v, cu_t, cu_t, max(lengths), max(lengths), None)
    ref = _reference(q, k, v, cu)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        error = (g.float() - w.float()).norm() / w.float().norm()
        assert error < 1e-2, f"d{name}: relative error {error:.3g}"
