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

`ContextParallelAttention` serves megatron's core-attention slot with it (models/kernel_provider.py).

Tensors here are [batch, heads, sequence, head_dim]; a rank's sequence is its two chunks, in
the order (chunk r, chunk 2·cp−1−r).
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
    """One kernel call: these query rows of the rank's 2c rows attend to this key range."""

    rows: slice
    keys: slice
    causal: bool


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


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, h, s, d], lse [b, h, s] fp32) of one block through torch's fused kernels."""
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
                   lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block, given the merged output and LSE of its query rows."""
    lse = lse.contiguous()
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            empty = torch.empty(0, dtype=torch.int32, device=q.device)
            seed = torch.empty((), dtype=torch.int64, device=q.device)
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, empty, empty, q.size(2), k.size(2), 0.0, causal, seed, seed, scale=scale)
        return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, torch.empty(()), torch.empty(()), 0.0, [True, True, True, False],
            causal, scale=scale)[:3]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


def forward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[Block], out: torch.Tensor,
                   lse: torch.Tensor, scale: float) -> None:
    """Add the blocks' attention into the running fp32 `out` and `lse` (merged by log-sum-exp)."""
    for block in blocks:
        o, l = block_forward(q[:, :, block.rows], k[:, :, block.keys], v[:, :, block.keys], block.causal, scale)
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
                                    lse[:, :, rows], block.causal, scale)
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


class RingAttention(torch.autograd.Function):
    """Ring mode; q, k, v: this rank's [b, h, 2c, d] (k, v may have fewer heads)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                scale: float) -> torch.Tensor:
        rank, cp, chunk = dist.get_rank(group), dist.get_world_size(group), q.size(2) // 2
        ring = _Ring(group)
        out, lse = _accumulators(q)
        kv = torch.stack([k, v])
        for step in range(cp):
            if step < cp - 1:  # the next block travels while this one is computed
                incoming, requests = ring.start(kv)
            forward_blocks(q, kv[0], kv[1], ring_blocks(rank, (rank - step) % cp, cp, chunk), out, lse, scale)
            if step < cp - 1:
                ring.wait(requests)
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        rank, cp, chunk = dist.get_rank(group), dist.get_world_size(group), q.size(2) // 2
        ring = _Ring(group)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        # The dK/dV of the block in hand; after cp shifts this rank's own come back to it.
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(cp):
            if step < cp - 1:
                incoming, requests = ring.start(kv)
            backward_blocks(dout, q, out, lse, kv[0], kv[1], ring_blocks(rank, (rank - step) % cp, cp, chunk),
                            dq, dkv[0], dkv[1], scale)
            dkv_incoming, dkv_requests = ring.start(dkv)
            ring.wait(dkv_requests)
            dkv = dkv_incoming
            if step < cp - 1:
                ring.wait(requests)
                kv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


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


class AllGatherAttention(torch.autograd.Function):
    """All-gather mode; q, k, v: this rank's [b, h, 2c, d] (k, v may have fewer heads)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                scale: float) -> torch.Tensor:
        rank, cp, chunk = dist.get_rank(group), dist.get_world_size(group), q.size(2) // 2
        kv = to_sequence_order(_all_gather(torch.stack([k, v]), group))
        out, lse = _accumulators(q)
        forward_blocks(q, kv[0], kv[1], allgather_blocks(rank, cp, chunk), out, lse, scale)
        out = out.to(q.dtype)
        # The gathered K/V is not kept: backward gathers it again.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        rank, cp, chunk = dist.get_rank(group), dist.get_world_size(group), q.size(2) // 2
        kv = to_sequence_order(_all_gather(torch.stack([k, v]), group))
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        backward_blocks(dout.contiguous(), q, out, lse, kv[0], kv[1], allgather_blocks(rank, cp, chunk),
                        dq, dkv[0], dkv[1], scale)
        dkv = _reduce_scatter(from_sequence_order(dkv, cp).contiguous(), group)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                               mode: str, scale: float | None = None) -> torch.Tensor:
    """Causal attention of this CP rank's two query chunks over the whole sequence.
    q: [b, heads, 2c, d]; k, v: [b, kv_heads, 2c, d]; returns [b, heads, 2c, d]."""
    if mode not in MODES:
        raise ValueError(f"unknown context-parallel attention mode {mode!r} (ring | allgather)")
    scale = q.size(-1) ** -0.5 if scale is None else scale
    function = RingAttention if mode == "ring" else AllGatherAttention
    return function.apply(q, k, v, group, scale)


class ContextParallelAttention(MegatronModule):
    """`core_attention` for megatron-core's SelfAttention under context parallelism (causal
    self-attention, unpacked rows): this rank's [s/cp, b, heads, d] q/k/v -> [s/cp, b, heads * d]."""

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
            raise NotImplementedError("context-parallel attention of packed (THD) rows")
        if (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal or attention_bias is not None:
            raise NotImplementedError("context-parallel attention is causal self-attention only")
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = context_parallel_attention(q, k, v, self.group, self.mode, self.softmax_scale)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)
