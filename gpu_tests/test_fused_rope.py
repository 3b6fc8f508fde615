"""The RoPE kernels (models/kernels/rope.py) against megatron's unfused function, on the GPU.

The reference is the unfused function in fp32 on the same inputs: the compiled kernel computes
bf16 inputs in fp32 and rounds once, the unfused one rounds after every op, so comparing the two
bf16 outputs with each other would measure the unfused one's error. Tolerance bf16 1e-2, fp32 1e-5."""
from __future__ import annotations

import types

import pytest
import torch

from models.kernels.rope import fused_qkv_rope, fused_rope_bshd, fused_rope_thd, unfused_rope_bshd, unfused_rope_thd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_fused_rope_matches_unfused(dtype, tol):
    torch.manual_seed(0)
    s, b, h, d = 1024, 2, 8, 64
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(s, device="cuda").float(), inv)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # megatron's [s, 1, 1, d]
    x = torch.randn(s, b, h, d, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(s, b, h, d, device="cuda", dtype=dtype)
    x32 = x.detach().float().requires_grad_()
    out = fused_rope_bshd(x, freqs)
    ref = unfused_rope_bshd(x32, freqs)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    (g_out,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x32, grad.float())
    torch.testing.assert_close(g_out.float(), g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_triton_rope_on_a_strided_key_view(dtype, tol):
    """k as megatron hands it: a view into the fused qkv output ([s, b, groups, (q + k + v) * d]),
    head dim 128, odd sizes, mscale != 1; forward and backward against the unfused fp32 function."""
    torch.manual_seed(1)
    s, b, groups, d = 333, 3, 4, 128
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(s, device="cuda").float(), inv)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    qkv = torch.randn(s, b, groups, 4 * d, device="cuda", dtype=dtype, requires_grad=True)
    k = qkv[..., 2 * d:3 * d]
    assert not k.is_contiguous()
    grad = torch.randn(s, b, groups, d, device="cuda", dtype=dtype)
    out = fused_rope_bshd(k, freqs, mscale=0.9)
    k32 = k.detach().float().requires_grad_()
    ref = unfused_rope_bshd(k32, freqs, mscale=0.9)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    (g_out,) = torch.autograd.grad(out, qkv, grad)
    (g_ref,) = torch.autograd.grad(ref, k32, grad.float())
    torch.testing.assert_close(g_out[..., 2 * d:3 * d].float(), g_ref, rtol=tol, atol=tol)
    assert g_out[..., :2 * d].abs().max() == 0 and g_out[..., 3 * d:].abs().max() == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_token_freqs", [False, True], ids=["restart_per_document", "row_per_token"])
def test_packed_rope_matches_megatron_thd_path(dtype, tol, per_token_freqs):
    """Packed rows [t, heads, d] of five documents (q as a view into the fused projection) against
    megatron's unfused THD path in fp32, which rotates each document from position 0 (or, given
    a freqs row per token, takes row i for token i)."""
    torch.manual_seed(4)
    heads, d = 6, 128
    cu = torch.tensor([0, 700, 701, 1500, 2900, 3000], device="cuda", dtype=torch.int32)
    tokens = int(cu[-1])
    rows = tokens if per_token_freqs else 1400
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(rows, device="cuda").float(), inv)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    group = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # megatron reads only these of its cp group
    qkv = torch.randn(tokens, heads, 3 * d, device="cuda", dtype=dtype, requires_grad=True)
    q = qkv[..., :d]
    out = fused_rope_thd(q, cu, freqs, mscale=1.1, cp_group=group)
    q32 = q.detach().float().requires_grad_()
    ref = unfused_rope_thd(q32, cu, freqs, mscale=1.1, cp_group=group)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    grad = torch.randn(tokens, heads, d, device="cuda", dtype=dtype)
    (g_out,) = torch.autograd.grad(out, qkv, grad)
    (g_ref,) = torch.autograd.grad(ref, q32, grad.float())
    torch.testing.assert_close(g_out[..., :d].float(), g_ref, rtol=tol, atol=tol)
    assert g_out[..., d:].abs().max() == 0


def _split_path(qkv: torch.Tensor, freqs: torch.Tensor, per_group: int):
    """megatron's unfused path on the fused projection: split, query heads out of their groups, RoPE on q and k."""
    d = qkv.shape[-1] // (per_group + 2)
    q, k, v = torch.split(qkv, [per_group * d, d, d], dim=3)
    q = q.reshape(q.shape[0], q.shape[1], -1, d)
    return unfused_rope_bshd(q, freqs), unfused_rope_bshd(k, freqs), v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(512, 2, 8, 2, 128), (77, 3, 2, 4, 64)], ids=["bench_heads", "odd"])
def test_fused_qkv_rope_matches_split_path(dtype, tol, shape):
    """fused_qkv_rope (one pass over the fused qkv projection) against the split path in fp32 on the
    same projection: rotated q, rotated k, v, and the projection's gradient."""
    s, b, groups, per_group, d = shape
    torch.manual_seed(2)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(s, device="cuda").float(), inv)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    qkv = torch.randn(s, b, groups, (per_group + 2) * d, device="cuda", dtype=dtype, requires_grad=True)
    out = fused_qkv_rope(qkv, freqs, freqs, [per_group * d, d, d])
    qkv32 = qkv.detach().float().requires_grad_()
    ref = _split_path(qkv32, freqs, per_group)
    grads = [torch.randn_like(t, dtype=dtype) for t in ref]
    for got, want in zip(out, ref):
        assert got.is_contiguous() and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    (g_out,) = torch.autograd.grad(out, qkv, grads)
    (g_ref,) = torch.autograd.grad(ref, qkv32, [g.float() for g in grads])
    torch.testing.assert_close(g_out.float(), g_ref, rtol=tol, atol=tol)


def test_attention_with_fused_qkv_rope_matches_split_path(build_engine, monkeypatch):
    """The engine's self-attention on GPU (RopeSelfAttention, GQA, fp32) with the fused qkv RoPE
    path and with q and k rotated one by one: output and the gradients of its input and qkv weight
    agree within 1e-5; and both agree with megatron's SelfAttention forward on the same module
    (megatron's unfused RoPE)."""
    from megatron.core.transformer.attention import SelfAttention

    from models import rope_attention
    from models.rope_attention import RopeSelfAttention

    args, engine = build_engine("tiny", seed=3, seq_length=128, micro_batch_size=2, params_dtype=torch.float32)
    device = torch.device("cuda")
    gpt = engine.chunks[0].module
    attention = gpt.decoder.layers[1].self_attention
    assert type(attention) is RopeSelfAttention
    freqs = gpt.rotary_pos_emb(128)
    hidden = torch.randn(128, 2, args.hidden_size, device=device, generator=torch.Generator("cuda").manual_seed(0))
    qkv_calls = []
    fused = rope_attention.fused_qkv_rope
    monkeypatch.setattr(rope_attention, "fused_qkv_rope", lambda *a: qkv_calls.append(1) or fused(*a))
    results = []
    for path in ("fused_qkv", "split", "megatron"):
        if path == "split":
            monkeypatch.setattr(RopeSelfAttention, "_fused_qkv_applies", lambda self: False)
        forward = SelfAttention.forward if path == "megatron" else RopeSelfAttention.forward
        x = hidden.clone().requires_grad_()
        out, _ = forward(attention, x, attention_mask=None, rotary_pos_emb=freqs)
        grads = torch.autograd.grad(out, [x, attention.linear_qkv.weight], torch.ones_like(out))
        results.append((out, *grads))
    assert len(qkv_calls) == 1  # the fused path ran once, the split path never
    for other in results[1:]:
        for got, want in zip(results[0], other):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert results[0][0].abs().max() > 0
