"""RoPE for the torch backend on GPU.

megatron-core without TransformerEngine/apex applies rotary embeddings unfused: cos and sin of
the frequencies, rotate-half through two cats, three multiplies and an add — each a pass over q
or k in memory. Here, for the common case (half rotation, no interleave, the whole head dim
rotated), one Triton kernel reads q or k once in whatever strides megatron hands it (k is a view
into the fused qkv projection) and writes the rotated rows; each program takes one position and
reads its cos/sin from a table computed once per forward for all layers (per element, the trig
cost more than the bytes); the backward is the same kernel rotating the other way. Other cases, and
layers under torch.compile (train.compile: inductor fuses the same function itself), run
megatron's function compiled by torch.compile.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

unfused_rope_bshd = rope_utils._apply_rotary_pos_emb_bshd
# dynamic=None: static shapes first, one dynamic recompile when packed rows change length.
compiled_rope_bshd = torch.compile(unfused_rope_bshd, fullgraph=True)


if triton is not None:
    @triton.jit
    def _rope_kernel(x_ptr, table_ptr, out_ptr, rows_per_position, heads, stride_s, stride_b, stride_h,
                     HALF: tl.constexpr, ROWS: tl.constexpr, BACKWARD: tl.constexpr):
        # One program per sequence position: its cos/sin row of the table, then every (batch, head) row at it.
        s = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, HALF)
        row = table_ptr + s * (4 * HALF) + cols  # table [s, 2 (cos, sin), 2 * HALF]
        c1, c2 = tl.load(row)[None, :], tl.load(row + HALF)[None, :]
        s1, s2 = tl.load(row + 2 * HALF)[None, :], tl.load(row + 3 * HALF)[None, :]
        for first in range(0, rows_per_position, ROWS):
            r = first + tl.arange(0, ROWS)
            mask = (r < rows_per_position)[:, None]
            src = (s * stride_s + (r // heads).to(tl.int64) * stride_b + (r % heads).to(tl.int64) * stride_h)[:, None]
            x1 = tl.load(x_ptr + src + cols[None, :], mask=mask).to(tl.float32)
            x2 = tl.load(x_ptr + src + HALF + cols[None, :], mask=mask).to(tl.float32)
            if BACKWARD:  # transpose of [x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]
                y1 = x1 * c1 + x2 * s2
                y2 = x2 * c2 - x1 * s1
            else:
                y1 = x1 * c1 - x2 * s1
                y2 = x2 * c2 + x1 * s2
            dst = ((s * rows_per_position + r.to(tl.int64)) * (2 * HALF))[:, None] + cols[None, :]
            tl.store(out_ptr + dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptr + dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


# (freqs, mscale, table) of the last call. megatron computes the frequencies once per forward for
# all layers (and lru-caches them across steps), so the table of mscale * cos/sin is computed once
# and read by every layer's q and k, forward and backward, instead of the trig per program.
_last_table: tuple[torch.Tensor, float, torch.Tensor] | None = None


def _cos_sin_table(freqs: torch.Tensor, mscale: float) -> torch.Tensor:
    """freqs [s, 1, 1, d] -> [s, 2, d] fp32: mscale * cos(freqs), mscale * sin(freqs)."""
    global _last_table
    if _last_table is None or _last_table[0] is not freqs or _last_table[1] != mscale:
        f = freqs.reshape(freqs.shape[0], -1)
        _last_table = freqs, mscale, torch.stack([f.cos() * mscale, f.sin() * mscale], dim=1)
    return _last_table[2]


def _rotate(x: torch.Tensor, table: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [s, b, heads, d] (any strides, last dim contiguous) -> contiguous rotated copy."""
    s, b, heads, d = x.shape
    out = torch.empty((s, b, heads, d), dtype=x.dtype, device=x.device)
    rows = min(32, triton.next_power_of_2(b * heads))
    _rope_kernel[(s,)](x, table, out, b * heads, heads, x.stride(0), x.stride(1), x.stride(2),
                       HALF=d // 2, ROWS=rows, BACKWARD=backward, num_warps=4)
    return out


class _TritonRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor, mscale: float) -> torch.Tensor:
        table = _cos_sin_table(freqs, mscale)
        ctx.save_for_backward(table)
        return _rotate(t, table, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (table,) = ctx.saved_tensors
        return _rotate(grad, table, backward=True), None, None


def _triton_applies(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool,
                    multi_latent_attention: bool) -> bool:
    d = t.shape[-1]
    return (triton is not None and t.is_cuda and t.dim() == 4 and not rotary_interleaved and not multi_latent_attention
            and freqs.shape[-1] == d and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0 and t.stride(-1) == 1
            and freqs.dtype == torch.float32 and freqs.is_contiguous() and freqs.shape[0] == t.shape[0]
            and freqs.numel() == t.shape[0] * d and not torch.compiler.is_compiling())


def fused_rope_bshd(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
                    multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
    """megatron's _apply_rotary_pos_emb_bshd (same arguments), on the Triton kernel where it applies."""
    if _triton_applies(t, freqs, rotary_interleaved, multi_latent_attention):
        return _TritonRope.apply(t, freqs, mscale)
    return compiled_rope_bshd(t, freqs, rotary_interleaved, multi_latent_attention, mscale)


def use_fused_rope() -> None:
    """Route megatron's apply_rotary_pos_emb (dense and THD) through the fused kernels."""
    rope_utils._apply_rotary_pos_emb_bshd = fused_rope_bshd
