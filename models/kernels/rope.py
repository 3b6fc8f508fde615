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

Packed rows (THD) without context parallelism take the same kernel over all documents at once,
from a per-token table built once per forward (`fused_rope_thd`).

Dense (unpacked) self-attention takes `fused_qkv_rope` instead (in the place of megatron's
`fused_single_qkv_rope` path): one kernel reads the fused qkv projection once and writes rotated
q, rotated k and a contiguous v; its backward writes the qkv gradient in place of the split's cat,
the two RoPE backwards and the copies that reshaped the query gradient.

models/rope_attention.py calls these functions (with megatron's arguments) from its attention.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

from models.kernels.deferred_compile import deferred_compile

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

unfused_rope_bshd = rope_utils._apply_rotary_pos_emb_bshd
unfused_rope_thd = rope_utils._apply_rotary_pos_emb_thd
# dynamic=None: static shapes first, one dynamic recompile when packed rows change length.
compiled_rope_bshd = deferred_compile(unfused_rope_bshd, fullgraph=True)


if triton is not None:
    @triton.jit
    def _rotate_halves(x1, x2, c1, c2, s1, s2, BACKWARD: tl.constexpr):
        if BACKWARD:  # transpose of [x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        return y1, y2

    @triton.jit
    def _table_row(table_ptr, s, cols, HALF: tl.constexpr):
        # Position s's row of the table [s, 2 (cos, sin), 2 * HALF], each half as a [1, HALF] row.
        row = table_ptr + s * (4 * HALF) + cols
        return (tl.load(row)[None, :], tl.load(row + HALF)[None, :],
                tl.load(row + 2 * HALF)[None, :], tl.load(row + 3 * HALF)[None, :])

    @triton.jit
    def _rope_kernel(x_ptr, table_ptr, out_ptr, rows_per_position, heads, stride_s, stride_b, stride_h,
                     HALF: tl.constexpr, ROWS: tl.constexpr, BACKWARD: tl.constexpr):
        # One program per sequence position: its cos/sin row of the table, then every (batch, head) row at it.
        s = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, HALF)
        c1, c2, s1, s2 = _table_row(table_ptr, s, cols, HALF)
        for first in range(0, rows_per_position, ROWS):
            r = first + tl.arange(0, ROWS)
            mask = (r < rows_per_position)[:, None]
            src = (s * stride_s + (r // heads).to(tl.int64) * stride_b + (r % heads).to(tl.int64) * stride_h)[:, None]
            x1 = tl.load(x_ptr + src + cols[None, :], mask=mask).to(tl.float32)
            x2 = tl.load(x_ptr + src + HALF + cols[None, :], mask=mask).to(tl.float32)
            y1, y2 = _rotate_halves(x1, x2, c1, c2, s1, s2, BACKWARD)
            dst = ((s * rows_per_position + r.to(tl.int64)) * (2 * HALF))[:, None] + cols[None, :]
            tl.store(out_ptr + dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptr + dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_rope_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, table_ptr, batch, groups,
                         qkv_stride_s, qkv_stride_b, q_stride_s, q_stride_b, q_stride_h,
                         k_stride_s, k_stride_b, k_stride_h, v_stride_s, v_stride_b, v_stride_h,
                         PER_GROUP: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr, BACKWARD: tl.constexpr):
        # One program per sequence position. A row is one head slot of one (batch, group) of the
        # fused projection [s, b, groups, (PER_GROUP query heads, key, value) * d]: query and key
        # slots rotate, the value slot is copied. Forward reads qkv and writes q, k, v; backward
        # reads their gradients and writes qkv's.
        s = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, HALF)
        c1, c2, s1, s2 = _table_row(table_ptr, s, cols, HALF)
        slots = PER_GROUP + 2
        rows_per_position = batch * groups * slots
        for first in range(0, rows_per_position, ROWS):
            r = first + tl.arange(0, ROWS)
            live = r < rows_per_position
            bi = (r // (groups * slots)).to(tl.int64)
            in_batch = r % (groups * slots)  # group * slots + slot: contiguous within a (s, b) row of qkv
            group, slot = (in_batch // slots).to(tl.int64), in_batch % slots
            is_q, is_k, is_v = live & (slot < PER_GROUP), live & (slot == PER_GROUP), live & (slot == PER_GROUP + 1)
            at_qkv = (s * qkv_stride_s + bi * qkv_stride_b + in_batch.to(tl.int64) * (2 * HALF))[:, None] + cols[None, :]
            at_q = (s * q_stride_s + bi * q_stride_b + (group * PER_GROUP + slot) * q_stride_h)[:, None] + cols[None, :]
            at_k = (s * k_stride_s + bi * k_stride_b + group * k_stride_h)[:, None] + cols[None, :]
            at_v = (s * v_stride_s + bi * v_stride_b + group * v_stride_h)[:, None] + cols[None, :]
            if BACKWARD:
                x1 = (tl.load(q_ptr + at_q, mask=is_q[:, None], other=0.0).to(tl.float32)
                      + tl.load(k_ptr + at_k, mask=is_k[:, None], other=0.0).to(tl.float32)
                      + tl.load(v_ptr + at_v, mask=is_v[:, None], other=0.0).to(tl.float32))
                x2 = (tl.load(q_ptr + at_q + HALF, mask=is_q[:, None], other=0.0).to(tl.float32)
                      + tl.load(k_ptr + at_k + HALF, mask=is_k[:, None], other=0.0).to(tl.float32)
                      + tl.load(v_ptr + at_v + HALF, mask=is_v[:, None], other=0.0).to(tl.float32))
            else:
                x1 = tl.load(qkv_ptr + at_qkv, mask=live[:, None]).to(tl.float32)
                x2 = tl.load(qkv_ptr + at_qkv + HALF, mask=live[:, None]).to(tl.float32)
            y1, y2 = _rotate_halves(x1, x2, c1, c2, s1, s2, BACKWARD)
            rotated = (slot <= PER_GROUP)[:, None]
            y1, y2 = tl.where(rotated, y1, x1), tl.where(rotated, y2, x2)
            if BACKWARD:
                out = qkv_ptr.dtype.element_ty
                tl.store(qkv_ptr + at_qkv, y1.to(out), mask=live[:, None])
                tl.store(qkv_ptr + at_qkv + HALF, y2.to(out), mask=live[:, None])
            else:
                out = q_ptr.dtype.element_ty
                tl.store(q_ptr + at_q, y1.to(out), mask=is_q[:, None])
                tl.store(q_ptr + at_q + HALF, y2.to(out), mask=is_q[:, None])
                tl.store(k_ptr + at_k, y1.to(out), mask=is_k[:, None])
                tl.store(k_ptr + at_k + HALF, y2.to(out), mask=is_k[:, None])
                tl.store(v_ptr + at_v, y1.to(out), mask=is_v[:, None])
                tl.store(v_ptr + at_v + HALF, y2.to(out), mask=is_v[:, None])


# (freqs, mscale, table) of the last call. megatron computes the frequencies once per forward for
# all layers (and lru-caches them across steps), so the table of mscale * cos/sin is computed once
# and read by every layer's q and k, forward and backward, instead of the trig per program.
_last_table: tuple[torch.Tensor, float, torch.Tensor] | None = None


def _scaled_cos_sin(f: torch.Tensor, mscale: float) -> torch.Tensor:
    """[rows, d] angles -> [rows, 2, d]: mscale * cos, mscale * sin (the kernels' table layout)."""
    return torch.stack([f.cos() * mscale, f.sin() * mscale], dim=1)


def _cos_sin_table(freqs: torch.Tensor, mscale: float) -> torch.Tensor:
    """freqs [s, 1, 1, d] -> [s, 2, d] fp32: mscale * cos(freqs), mscale * sin(freqs)."""
    global _last_table
    if _last_table is None or _last_table[0] is not freqs or _last_table[1] != mscale:
        f = freqs.reshape(freqs.shape[0], -1)
        _last_table = freqs, mscale, _scaled_cos_sin(f, mscale)
    return _last_table[2]


def _rotate(x: torch.Tensor, table: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [s, b, heads, d] (any strides, last dim contiguous) -> contiguous rotated copy."""
    s, b, heads, d = x.shape
    out = torch.empty((s, b, heads, d), dtype=x.dtype, device=x.device)
    rows = min(32, triton.next_power_of_2(b * heads))
    _rope_kernel[(s,)](x, table, out, b * heads, heads, x.stride(0), x.stride(1), x.stride(2),
                       HALF=d // 2, ROWS=rows, BACKWARD=backward, num_warps=4)
    return out


# (freqs, cu_seqlens, mscale, table) of the last packed call: every layer's q and k of one forward
# share cu_seqlens and freqs, so the per-token table is built once, not per layer.
_last_thd_table: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None


def _thd_cos_sin_table(freqs: torch.Tensor, cu_seqlens: torch.Tensor, tokens: int, mscale: float) -> torch.Tensor:
    """[tokens, 2, d] fp32 table of packed rows: token i takes freqs' row of its position in its own
    document, as megatron's unfused THD path maps it (or row i when freqs has a row per token).
    No host sync: the positions come from a searchsorted over cu_seqlens on the device."""
    global _last_thd_table
    cached = _last_thd_table
    if cached is None or cached[0] is not freqs or cached[1] is not cu_seqlens or cached[2] != mscale:
        f = freqs.reshape(freqs.shape[0], -1)[_packed_positions(freqs, cu_seqlens, tokens)]
        _last_thd_table = freqs, cu_seqlens, mscale, _scaled_cos_sin(f, mscale)
    return _last_thd_table[3]


def _packed_positions(freqs: torch.Tensor, cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """The row of freqs each packed token takes (without context parallelism): its position in its
    own document, or row i for token i when freqs has a row per token (megatron's two THD cases)."""
    index = torch.arange(tokens, device=freqs.device)
    if freqs.shape[0] != tokens:  # megatron's case 2: positions restart at every document
        starts = cu_seqlens.to(device=freqs.device, dtype=torch.long)
        index = index - starts[torch.searchsorted(starts[1:], index, right=True)]
    return index


class _TritonRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table)
        return _rotate(t, table, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (table,) = ctx.saved_tensors
        return _rotate(grad, table, backward=True), None


def _triton_applies(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool,
                    multi_latent_attention: bool, dims: int = 4) -> bool:
    d = t.shape[-1]
    return (triton is not None and t.is_cuda and t.dim() == dims and not rotary_interleaved
            and not multi_latent_attention and freqs.shape[-1] == d and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0
            and t.stride(-1) == 1 and freqs.dtype == torch.float32 and freqs.is_contiguous()
            and freqs.numel() == freqs.shape[0] * d and not torch.compiler.is_compiling())


def fused_rope_bshd(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
                    multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
    """megatron's _apply_rotary_pos_emb_bshd (same arguments), on the Triton kernel where it applies."""
    if _triton_applies(t, freqs, rotary_interleaved, multi_latent_attention) and freqs.shape[0] == t.shape[0]:
        return _TritonRope.apply(t, _cos_sin_table(freqs, mscale))
    return compiled_rope_bshd(t, freqs, rotary_interleaved, multi_latent_attention, mscale)


def fused_rope_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
                   multi_latent_attention: bool = False, mscale: float = 1.0, cp_group=None) -> torch.Tensor:
    """megatron's _apply_rotary_pos_emb_thd (same arguments): packed rows [t, heads, d]. Without
    context parallelism, one kernel over all documents from a per-token table; megatron's path
    splits the rows per document (a host sync per document and layer) and builds the table anew."""
    if cp_group is None or cp_group.size() != 1:
        return unfused_rope_thd(t, cu_seqlens, freqs, rotary_interleaved, multi_latent_attention, mscale, cp_group)
    if _triton_applies(t, freqs, rotary_interleaved, multi_latent_attention, dims=3):
        table = _thd_cos_sin_table(freqs, cu_seqlens, t.shape[0], mscale)
        return _TritonRope.apply(t.unsqueeze(1), table).squeeze(1)
    # megatron's THD path: each token's freqs row, then its bshd function over all tokens at once
    # (here fused_rope_bshd; megatron's would be the unfused one)
    packed = freqs[_packed_positions(freqs, cu_seqlens, t.shape[0])]
    return fused_rope_bshd(t.unsqueeze(1), packed, rotary_interleaved, multi_latent_attention, mscale).squeeze(1)


class _TritonQkvRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, freqs: torch.Tensor, per_group: int):
        s, b, groups, width = qkv.shape
        d = width // (per_group + 2)
        table = _cos_sin_table(freqs, 1.0)
        q = torch.empty((s, b, groups * per_group, d), dtype=qkv.dtype, device=qkv.device)
        k, v = (torch.empty((s, b, groups, d), dtype=qkv.dtype, device=qkv.device) for _ in range(2))
        _launch_qkv(qkv, q, k, v, table, per_group, backward=False)
        ctx.save_for_backward(table)
        ctx.per_group = per_group
        return q, k, v

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        (table,) = ctx.saved_tensors
        s, b, heads, d = dq.shape
        dqkv = torch.empty((s, b, dk.shape[2], (ctx.per_group + 2) * d), dtype=dq.dtype, device=dq.device)
        dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        _launch_qkv(dqkv, dq, dk, dv, table, ctx.per_group, backward=True)
        return dqkv, None, None


def _launch_qkv(qkv, q, k, v, table, per_group: int, backward: bool) -> None:
    s, b, groups, _ = k.shape
    rows = min(32, triton.next_power_of_2(b * groups * (per_group + 2)))
    _qkv_rope_kernel[(s,)](qkv, q, k, v, table, b, groups, qkv.stride(0), qkv.stride(1),
                           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                           PER_GROUP=per_group, HALF=k.shape[-1] // 2, ROWS=rows, BACKWARD=backward, num_warps=4)


def fused_qkv_rope(qkv: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor, qkv_split_arg_list: list[int],
                   *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TransformerEngine's apply_fused_qkv_rotary_pos_emb as megatron calls it: the fused projection
    [s, b, groups, (q heads per group + 2) * d] -> rotated query [s, b, heads, d], rotated key and
    value [s, b, groups, d], all contiguous (no rotary interleave, mscale 1, sbhd)."""
    if args or kwargs:
        raise NotImplementedError("fused_qkv_rope takes only megatron's four arguments")
    d = qkv_split_arg_list[1]
    per_group = qkv_split_arg_list[0] // d
    if (q_freqs is k_freqs and qkv.stride(-1) == 1 and qkv.stride(2) == qkv.shape[3]
            and q_freqs.shape[0] == qkv.shape[0] and _triton_applies(qkv[..., :d], q_freqs, False, False)):
        return _TritonQkvRope.apply(qkv, q_freqs, per_group)
    # megatron's split path: split, query heads out of their groups, RoPE each
    query, key, value = torch.split(qkv, qkv_split_arg_list, dim=3)
    query = query.reshape(query.size(0), query.size(1), -1, d)
    return fused_rope_bshd(query, q_freqs), fused_rope_bshd(key, k_freqs), value.contiguous()
