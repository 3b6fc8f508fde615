"""Causal attention under context parallelism: each rank holds two chunks of the sequence.

The sequence is cut into 2·cp chunks of c tokens; CP rank r holds chunks r and 2·cp−1−r (so
every rank gets the same share of causal work). Its queries must attend to the keys of all
earlier chunks, which live on other ranks. Two ways to get them:

- all-gather (`AllGatherAttention`): every rank gathers the whole K/V (memory ∝ sequence), puts
  the chunks in sequence order and attends each query chunk to its prefix: the earlier chunks
  without a mask, its own chunk causally. Backward gathers again and reduce-scatters dK/dV.
- ring (`RingAttention`): K/V blocks travel around the CP group (P2P), one block per step
  (memory ∝ sequence / cp). Backward runs the ring again; the dK/dV of each block travel with
  it and arrive at their owner after a full turn.

Either way attention is a sum of blocks (query rows × key range, full or causal), each run by
torch's fused kernel that returns the log-sum-exp (LSE) of its rows: flash on CUDA (the
memory-efficient kernel for fp32), the CPU flash kernel elsewhere. Partial outputs merge by
their LSE; a block's backward is the kernel's own backward given the merged output and LSE,
which is the exact gradient of that block's share. Grouped-query K/V are never expanded: the
kernels take fewer key/value heads than query heads.

Packed rows (THD, several documents in one stream) split per document: every document (padded
to a multiple of 2·cp by the batch split, parallel/engine.py) is cut into 2·cp chunks of c_i
tokens and rank r holds chunks r and 2·cp−1−r of each, documents in stream order, so every rank
holds 2·c_i tokens of document i and the per-rank cumulative lengths `cu_seqlens` are the same
on all ranks. A token of rank r may attend a token of rank s when both are in the same document
and the key's position in the document is not after the query's: each (query rank, key rank)
block runs with that block-diagonal causal mask as an additive mask (`packed_mask`). Rows that
see nothing of a block get a finite, very negative LSE, so they weigh nothing in the merge. The
mask is dense ([rows, keys] per block): the CPU flash kernel takes it, and on CUDA the
memory-efficient kernel as its bias (the flash kernels take no mask).

`ContextParallelAttention` serves megatron's core-attention slot with it (models/kernel_provider.py).

Tensors here are [batch, heads, sequence, head_dim]; a rank's sequence is its two chunks, in
the order (chunk r, chunk 2·cp−1−r), per document for packed rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

MODES = ("ring", "allgather")


class Block(NamedTuple):
    """One kernel call: these query rows of the rank's 2c rows attend to this key range, causally
    or under `mask` (additive [rows, keys]: 0 where a query sees a key; packed rows)."""

    rows: slice
    keys: slice
    causal: bool
    mask: torch.Tensor | None = None


ALL = slice(None)


def packed_positions(cu_seqlens: torch.Tensor, rank: int, cp: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document, position in the document) of each of rank `rank`'s `total` tokens of a packed
    stream; `cu_seqlens`: the per-rank cumulative document lengths (2·c_i tokens of document i:
    its chunk r, then its chunk 2·cp−1−r)."""
    cu = cu_seqlens.to(dtype=torch.long)
    half = (cu[1:] - cu[:-1]) // 2
    docs = torch.repeat_interleave(torch.arange(half.numel(), device=cu.device), 2 * half, output_size=total)
    within, c = torch.arange(total, device=cu.device) - cu[:-1][docs], half[docs]
    position = torch.where(within < c, rank * c + within, (2 * cp - 1 - rank) * c + within - c)
    return docs, position


def packed_mask(cu_seqlens: torch.Tensor, rank: int, sources: list[int], cp: int, total: int,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [total, total·len(sources)] mask of rank `rank`'s queries over the keys of the
    `sources` ranks (concatenated in that order): 0 where the key is in the query's document and
    not after it, a large negative number elsewhere (finite: a row that sees no key of the block
    gets a very negative LSE, not NaN, and so no weight in the merge)."""
    cu_seqlens = cu_seqlens.to(device)
    q_doc, q_pos = packed_positions(cu_seqlens, rank, cp, total)
    keys = [packed_positions(cu_seqlens, source, cp, total) for source in sources]
    k_doc, k_pos = (torch.cat(x) for x in zip(*keys))
    seen = (q_doc[:, None] == k_doc[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min / 2)


def packed_ring_blocks(rank: int, source: int, cp: int, cu_seqlens: torch.Tensor, q: torch.Tensor) -> list[Block]:
    """Ring mode over packed rows: all of rank `rank`'s rows (q) against all of rank `source`'s keys, masked."""
    return [Block(ALL, ALL, False, packed_mask(cu_seqlens, rank, [source], cp, q.size(2), q.dtype, q.device))]


def packed_allgather_blocks(rank: int, cp: int, cu_seqlens: torch.Tensor, q: torch.Tensor) -> list[Block]:
    """All-gather mode over packed rows: all rows (q) against every rank's keys (in rank order), masked."""
    return [Block(ALL, ALL, False, packed_mask(cu_seqlens, rank, list(range(cp)), cp, q.size(2), q.dtype, q.device))]


def ring_blocks(rank: int, source: int, cp: int, chunk: int) -> list[Block]:
    """Ring mode: the blocks rank `rank` computes with the K/V of rank `source` (its 2c keys, in
    that rank's chunk order). Chunk i attends chunk j fully when j < i, causally when j == i."""
    both, first, second = slice(0, 2 * chunk), slice(0, chunk), slice(chunk, 2 * chunk)
    if source == rank:
        # Causal over the rank's concatenated chunks: chunk r cannot see the later chunk
        # 2cp-1-r, which sees all of chunk r: exactly the causal mask of the concatenation.
        return [Block(both, both, True)]
    if source < rank:  # the source's first chunk is earlier than both of ours, its second later
        return [Block(both, first, False)]
    return [Block(second, both, False)]  # both source chunks lie between our two


def allgather_blocks(rank: int, cp: int, chunk: int) -> list[Block]:
    """All-gather mode: the blocks of rank `rank` against the whole K/V in sequence order."""
    blocks = []
    for half, index in ((0, rank), (1, 2 * cp - 1 - rank)):
        rows = slice(half * chunk, (half + 1) * chunk)
        if index > 0:
            blocks.append(Block(rows, slice(0, index * chunk), False))
        blocks.append(Block(rows, slice(index * chunk, (index + 1) * chunk), True))
    return blocks


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, h, s, d], lse [b, h, s] fp32) of one block through torch's fused kernels."""
    if mask is not None:
        return _masked_forward(q, k, v, mask, scale)
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)
            return out, lse
        if k.size(1) != q.size(1):  # the memory-efficient kernel has no GQA
            raise NotImplementedError("fp32 context-parallel attention on CUDA with grouped-query attention")
        out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                               scale=scale)
        return out, lse[..., :q.size(2)]  # (its LSE rows are padded)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block, given the merged output and LSE of its query rows."""
    lse = lse.contiguous()
    if mask is not None:
        return _masked_backward(dout, q, k, v, out, lse, mask, scale)
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            # cum_seq_q/k undefined (None), as the dense forward returns them: a defined tensor, even
            # an empty one, sends the kernel down its varlen path ("batch size must be positive")
            seed = torch.empty((), dtype=torch.int64, device=q.device)
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, causal, seed, seed, scale=scale)
        return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, torch.empty(()), torch.empty(()), 0.0, [True, True, True, False],
            causal, scale=scale)[:3]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


def _masked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A block under an additive mask: torch's CPU flash kernel takes one (GQA as well); on CUDA
    the memory-efficient kernel takes it as a bias (without GQA: K/V heads repeated)."""
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                            scale=scale)
    k, v = _repeat_heads(k, q.size(1)), _repeat_heads(v, q.size(1))
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, _bias(mask, q), True, 0.0, False,
                                                                           scale=scale)
    return out, lse[..., :q.size(2)]  # (its LSE rows are padded)


def _masked_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    heads, kv_heads = q.size(1), k.size(1)
    k, v = _repeat_heads(k, heads), _repeat_heads(v, heads)
    # the LSE in the padded row layout the kernel's forward returns it in: +inf in the padding rows, as
    # that forward writes there (the backward reads them for the last tile's rows; +inf gives them weight 0)
    padded = torch.full((*lse.shape[:-1], -(-lse.size(-1) // 32) * 32), float("inf"), dtype=lse.dtype,
                        device=lse.device)
    padded[..., :lse.size(-1)] = lse
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, _bias(mask, q), out, padded, torch.empty(()), torch.empty(()), 0.0, [True, True, True, False],
        False, scale=scale)
    if kv_heads != heads:  # the repeated heads' gradients summed into their K/V head
        dk, dv = (g.unflatten(1, (kv_heads, heads // kv_heads)).sum(2) for g in (dk, dv))
    return dq, dk, dv


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.size(1) == heads else x.repeat_interleave(heads // x.size(1), dim=1)


def _bias(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[rows, keys] mask as the memory-efficient kernel's [b, heads, rows, keys] bias: broadcast over
    batch and heads, its rows 16-element aligned as the kernel requires (zeros in the alignment
    columns, as SDPA's own padding of a mask leaves them)."""
    rows, keys = mask.shape
    storage = torch.zeros(rows, -(-keys // 16) * 16, dtype=mask.dtype, device=mask.device)
    storage[:, :keys] = mask
    return storage[:, :keys].expand(q.size(0), q.size(1), rows, keys)


def forward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[Block], out: torch.Tensor,
                   lse: torch.Tensor, scale: float) -> None:
    """Add the blocks' attention into the running fp32 `out` and `lse` (merged by log-sum-exp)."""
    for block in blocks:
        o, l = block_forward(q[:, :, block.rows], k[:, :, block.keys], v[:, :, block.keys], block.causal, scale,
                             block.mask)
        acc_out, acc_lse = out[:, :, block.rows], lse[:, :, block.rows]
        merged = torch.logaddexp(acc_lse, l)
        acc_out.mul_(torch.exp(acc_lse - merged).unsqueeze(-1))
        acc_out.add_(o.float() * torch.exp(l - merged).unsqueeze(-1))
        acc_lse.copy_(merged)


def backward_blocks(dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, blocks: list[Block], dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                    scale: float) -> None:
    """Add the blocks' gradients into the fp32 `dq` (rows) and `dk`, `dv` (key ranges)."""
    for block in blocks:
        rows, keys = block.rows, block.keys
        gq, gk, gv = block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                                    lse[:, :, rows], block.causal, scale, block.mask)
        dq[:, :, rows] += gq
        dk[:, :, keys] += gk
        dv[:, :, keys] += gv


def _accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


class _Ring:
    """Shifts a tensor one rank along the CP group: sends to the next rank, receives from the previous."""

    def __init__(self, group: dist.ProcessGroup):
        ranks = dist.get_process_group_ranks(group)
        me = ranks.index(dist.get_rank())
        self.group, self.next, self.prev = group, ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]

    def start(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list]:
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests: list) -> None:
        for request in requests:
            request.wait()


def _ring_step(rank: int, source: int, cp: int, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[Block]:
    if cu_seqlens is None:
        return ring_blocks(rank, source, cp, q.size(2) // 2)
    return packed_ring_blocks(rank, source, cp, cu_seqlens, q)


class RingAttention(torch.autograd.Function):
    """Ring mode; q, k, v: this rank's [b, h, 2c, d] (k, v may have fewer heads); packed rows:
    b = 1 and `cu_seqlens` the per-rank cumulative document lengths."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                scale: float, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        ring = _Ring(group)
        out, lse = _accumulators(q)
        kv = torch.stack([k, v])
        for step in range(cp):
            if step < cp - 1:  # the next block travels while this one is computed
                incoming, requests = ring.start(kv)
            forward_blocks(q, kv[0], kv[1], _ring_step(rank, (rank - step) % cp, cp, q, cu_seqlens), out, lse, scale)
            if step < cp - 1:
                ring.wait(requests)
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        ring = _Ring(group)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        # The dK/dV of the block in hand; after cp shifts this rank's own come back to it.
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(cp):
            if step < cp - 1:
                incoming, requests = ring.start(kv)
            backward_blocks(dout, q, out, lse, kv[0], kv[1], _ring_step(rank, (rank - step) % cp, cp, q, cu_seqlens),
                            dq, dkv[0], dkv[1], scale)
            dkv_incoming, dkv_requests = ring.start(dkv)
            ring.wait(dkv_requests)
            dkv = dkv_incoming
            if step < cp - 1:
                ring.wait(requests)
                kv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def to_sequence_order(gathered: torch.Tensor) -> torch.Tensor:
    """[cp, ..., 2c, d] (each rank's two chunks) -> [..., 2·cp·c, d] in sequence order."""
    cp, chunk = gathered.size(0), gathered.size(-2) // 2
    halves = gathered.unflatten(-2, (2, chunk))  # [cp, ..., 2, c, d]
    first, second = halves.select(-3, 0), halves.select(-3, 1).flip(0)  # chunks 0..cp-1, then cp..2cp-1
    return torch.cat([first, second]).movedim(0, -3).flatten(-3, -2)


def from_sequence_order(full: torch.Tensor, cp: int) -> torch.Tensor:
    """Inverse of to_sequence_order: [..., 2·cp·c, d] -> [cp, ..., 2c, d]."""
    chunks = full.unflatten(-2, (2 * cp, -1)).movedim(-3, 0)  # [2cp, ..., c, d]
    return torch.stack([chunks[:cp], chunks[cp:].flip(0)], dim=-3).flatten(-3, -2)


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[cp, *tensor.shape]: every rank's tensor."""
    size = dist.get_world_size(group)
    gathered = torch.empty((size * tensor.size(0), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=group)
    return gathered.unflatten(0, (size, tensor.size(0)))


def _reduce_scatter(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[cp, ...] summed over the group; this rank's slice."""
    if dist.get_backend(group) == dist.Backend.GLOO:  # gloo has no reduce-scatter
        dist.all_reduce(tensor, group=group)
        return tensor[dist.get_rank(group)]
    out = torch.empty(tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
    dist.reduce_scatter_tensor(out, tensor, group=group)
    return out


def gathered_keys(gathered: torch.Tensor, packed: bool) -> torch.Tensor:
    """Every rank's K/V [cp, ..., s, d] as the keys of the all-gather blocks: in sequence order, or
    for packed rows the ranks' streams one after the other (their mask places each token)."""
    return gathered.movedim(0, -3).flatten(-3, -2) if packed else to_sequence_order(gathered)


def scattered_keys(full: torch.Tensor, cp: int, packed: bool) -> torch.Tensor:
    """Inverse of gathered_keys: [..., cp·s, d] -> [cp, ..., s, d]."""
    return full.unflatten(-2, (cp, -1)).movedim(-3, 0) if packed else from_sequence_order(full, cp)


def _allgather_step(rank: int, cp: int, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[Block]:
    if cu_seqlens is None:
        return allgather_blocks(rank, cp, q.size(2) // 2)
    return packed_allgather_blocks(rank, cp, cu_seqlens, q)


class AllGatherAttention(torch.autograd.Function):
    """All-gather mode; q, k, v: this rank's [b, h, 2c, d] (k, v may have fewer heads); packed rows:
    b = 1 and `cu_seqlens` the per-rank cumulative document lengths."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                scale: float, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        rank, cp, packed = dist.get_rank(group), dist.get_world_size(group), cu_seqlens is not None
        kv = gathered_keys(_all_gather(torch.stack([k, v]), group), packed)
        out, lse = _accumulators(q)
        forward_blocks(q, kv[0], kv[1], _allgather_step(rank, cp, q, cu_seqlens), out, lse, scale)
        out = out.to(q.dtype)
        # The gathered K/V is not kept: backward gathers it again.
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        rank, cp, packed = dist.get_rank(group), dist.get_world_size(group), cu_seqlens is not None
        kv = gathered_keys(_all_gather(torch.stack([k, v]), group), packed)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        backward_blocks(dout.contiguous(), q, out, lse, kv[0], kv[1], _allgather_step(rank, cp, q, cu_seqlens),
                        dq, dkv[0], dkv[1], scale)
        dkv = _reduce_scatter(scattered_keys(dkv, cp, packed).contiguous(), group)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                               mode: str, scale: float | None = None,
                               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this CP rank's two query chunks over the whole sequence.
    q: [b, heads, 2c, d]; k, v: [b, kv_heads, 2c, d]; returns [b, heads, 2c, d]. Packed rows:
    b = 1, `cu_seqlens` this rank's cumulative document lengths (the same on every rank), and
    attention stays inside each document."""
    if mode not in MODES:
        raise ValueError(f"unknown context-parallel attention mode {mode!r} (ring | allgather)")
    scale = q.size(-1) ** -0.5 if scale is None else scale
    function = RingAttention if mode == "ring" else AllGatherAttention
    return function.apply(q, k, v, group, scale, cu_seqlens)


class ContextParallelAttention(MegatronModule):
    """`core_attention` for megatron-core's SelfAttention under context parallelism (causal
    self-attention): this rank's [s/cp, b, heads, d] q/k/v -> [s/cp, b, heads * d]; packed rows
    (THD) [t/cp, heads, d] -> [t/cp, heads * d], their cu_seqlens those of the whole stream with
    every document a multiple of 2·cp tokens long (the batch split pads them)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None, pg_collection=None,
                 mode: str = "ring"):
        super().__init__(config=config)
        if mode not in MODES:
            raise ValueError(f"unknown context-parallel attention mode {mode!r} (ring | allgather)")
        self.mode, self.attn_mask_type = mode, attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.softmax_scale
        self.group = pg_collection.cp if pg_collection is not None else ps.get_context_parallel_group()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        if (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal or attention_bias is not None:
            raise NotImplementedError("context-parallel attention is causal self-attention only")
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = context_parallel_attention(q, k, v, self.group, self.mode, self.softmax_scale)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params) -> torch.Tensor:
        if params.qkv_format != "thd":
            raise NotImplementedError(f"packed qkv_format {params.qkv_format!r} (only 'thd')")
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        # this rank's share of each document: 1/cp of it
        cu = torch.div(cu, dist.get_world_size(self.group), rounding_mode="floor")
        # [t, heads, d] -> [1, heads, t, d]
        q, k, v = (t.reshape(t.size(0), t.size(-2), t.size(-1)).transpose(0, 1).unsqueeze(0)
                   for t in (query, key, value))
        out = context_parallel_attention(q, k, v, self.group, self.mode, self.softmax_scale, cu_seqlens=cu)
        # [1, heads, t, d] -> [t, heads * d]
        return out.squeeze(0).transpose(0, 1).reshape(out.size(2), -1)
