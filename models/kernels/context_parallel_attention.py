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
on all ranks. Each block is varlen attention over segments (one or two per document), every
segment either square and causal (queries and keys are the same tokens) or full, so no mask and
no question of how a causal mask aligns arises (`packed_ring_blocks`, `packed_allgather_blocks`);
the blocks gather their rows and keys by index, and every row of a block sees a key of it. On
CUDA in fp16/bf16 torch's varlen flash kernels run them; elsewhere (CPU; fp32 on CUDA) a block runs
as a dense block under its segments' mask (`segment_mask`), which is [rows, keys] per block.

`ContextParallelAttention` serves megatron's core-attention slot with it (models/kernel_provider.py).

Tensors here are [batch, heads, sequence, head_dim]; a rank's sequence is its two chunks, in
the order (chunk r, chunk 2·cp−1−r), per document for packed rows.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

MODES = ("ring", "allgather")


class Block(NamedTuple):
    """One kernel call: these query rows of the rank's rows attend to these keys (a slice, or an
    index tensor for packed rows), causally (square) or fully. Packed rows: `cu_q`/`cu_k` (int32)
    cut the rows and keys into segments, segment i of the rows attending segment i of the keys
    only (varlen attention; a causal segment is square)."""

    rows: slice | torch.Tensor
    keys: slice | torch.Tensor
    causal: bool
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0



def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The concatenated ranges [start, start + length) (long)."""
    total = int(lengths.sum())
    offsets = lengths.cumsum(0) - lengths
    return torch.repeat_interleave(starts - offsets, lengths, output_size=total) + torch.arange(total)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _documents(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row, c_i) of each non-empty document of a rank's packed rows, on the host (the
    kernels take the segments' largest length as a host integer)."""
    cu = cu_seqlens.detach().to("cpu", torch.long)
    start, length = cu[:-1], cu[1:] - cu[:-1]
    if bool((length % 2).any()):
        raise ValueError("context-parallel packed rows: each document must hold two equal chunks on every rank")
    keep = length > 0  # an empty document has no rows (and the kernels would give it a +inf LSE)
    return start[keep], length[keep] // 2


def _varlen_block(rows: slice | torch.Tensor, keys: slice | torch.Tensor, causal: bool, q_lengths: torch.Tensor,
                  k_lengths: torch.Tensor, device: torch.device) -> Block:
    def place(index):
        return index.to(device) if isinstance(index, torch.Tensor) else index

    return Block(place(rows), place(keys), causal, _cumulative(q_lengths).to(device),
                 _cumulative(k_lengths).to(device), int(q_lengths.max()), int(k_lengths.max()))


def packed_ring_blocks(rank: int, cp: int, cu_seqlens: torch.Tensor, device: torch.device) -> list[list[Block]]:
    """Ring mode over packed rows: for each source rank s, the blocks of rank `rank`'s rows against
    s's keys. Per document, our chunks r, 2cp−1−r against s's chunks s, 2cp−1−s:
    s == r: the document's 2c_i tokens against themselves, causally (chunk 2cp−1−r sees all of
    chunk r, which sees none of it: the causal mask of the concatenation);
    s < r: both our chunks see chunk s (the first c_i keys) fully, and not chunk 2cp−1−s (later);
    s > r: only our chunk 2cp−1−r (the second c_i rows) sees s's tokens, all 2c_i of them, fully."""
    start, half = _documents(cu_seqlens)
    if half.numel() == 0:
        return [[] for _ in range(cp)]
    both = slice(int(start[0]), int(start[0]) + 2 * int(half.sum()))  # the documents' rows, one after another
    first, second = _ranges(start, half), _ranges(start + half, half)
    own = _varlen_block(both, both, True, 2 * half, 2 * half, device)
    earlier = _varlen_block(both, first, False, 2 * half, half, device)
    later = _varlen_block(second, both, False, half, 2 * half, device)
    return [[own] if s == rank else [earlier] if s < rank else [later] for s in range(cp)]


def packed_allgather_blocks(rank: int, cp: int, cu_seqlens: torch.Tensor, total: int,
                            device: torch.device) -> list[Block]:
    """All-gather mode over packed rows: rank `rank`'s rows against every rank's keys, the ranks'
    `total`-token streams one after another (gathered_keys). Per document, query chunk
    j in {r, 2cp−1−r} sees chunks 0..j−1 fully and chunk j (these same tokens of our own stream)
    causally: one full block (chunk j = 0 has none) and one causal block of square segments."""
    start, half = _documents(cu_seqlens)
    if half.numel() == 0:
        return []
    c = 2 * cp
    both = slice(int(start[0]), int(start[0]) + 2 * int(half.sum()))  # the documents' rows, one after another
    halves = half.repeat_interleave(2)  # segments: (document, chunk r), (document, chunk 2cp-1-r)
    own = slice(rank * total + both.start, rank * total + both.stop)  # these rows' own keys
    blocks = [_varlen_block(both, own, True, halves, halves, device)]
    # where chunk m of each document lies among the gathered keys: chunk m < cp is rank m's first
    # half, chunk m >= cp rank 2cp-1-m's second half
    m = torch.arange(c)
    owner = torch.where(m < cp, m, c - 1 - m)
    chunk_start = owner * total + start[:, None] + torch.where(m < cp, 0, 1) * half[:, None]  # [docs, 2cp]
    later = c - 1 - rank
    starts = torch.cat([chunk_start[:, :rank], chunk_start[:, :later]], dim=1).flatten()
    keys = _ranges(starts, half.repeat_interleave(rank + later))
    if rank == 0:  # chunk 0 has no earlier chunk: only the second halves attend here
        rows, q_lengths, k_lengths = _ranges(start + half, half), half, later * half
    else:
        rows, q_lengths, k_lengths = both, halves, torch.stack([rank * half, later * half], dim=1).flatten()
    blocks.append(_varlen_block(rows, keys, False, q_lengths, k_lengths, device))
    return blocks


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


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Block,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, h, s, d], lse [b, h, s] fp32) of one block (q, k, v: its rows and keys) through
    torch's fused kernels. The one place that picks the kernel of a block."""
    if block.cu_q is not None:
        if _flash_varlen(q):
            return _varlen_forward(q, k, v, block, scale)
        return _masked_forward(q, k, v, segment_mask(block, q.dtype), scale)
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, block.causal, scale=scale)
            return out, lse
        if k.size(1) != q.size(1):  # the memory-efficient kernel has no GQA
            raise NotImplementedError("fp32 context-parallel attention on CUDA with grouped-query attention")
        out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, block.causal,
                                                                               scale=scale)
        return out, lse[..., :q.size(2)]  # (its LSE rows are padded)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, block.causal, scale=scale)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, block: Block,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block, given the merged output and LSE of its query rows."""
    lse = lse.contiguous()
    if block.cu_q is not None:
        if _flash_varlen(q):
            return _varlen_backward(dout, q, k, v, out, lse, block, scale)
        return _masked_backward(dout, q, k, v, out, lse, segment_mask(block, q.dtype), scale)
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            # cum_seq_q/k undefined (None), as the dense forward returns them: a defined tensor, even
            # an empty one, sends the kernel down its varlen path ("batch size must be positive")
            seed = torch.empty((), dtype=torch.int64, device=q.device)
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, block.causal, seed, seed, scale=scale)
        return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, torch.empty(()), torch.empty(()), 0.0, [True, True, True, False],
            block.causal, scale=scale)[:3]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, block.causal, scale=scale)


def _flash_varlen(q: torch.Tensor) -> bool:
    """Whether torch's varlen flash kernels run the packed blocks of these rows (CUDA, fp16/bf16);
    elsewhere a block runs as a masked dense block."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[1, h, n, d] -> the varlen kernels' [n, h, d] (a view: they take any row and head strides)."""
    return x[0].transpose(0, 1)


def _varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Block,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        _tokens(q), _tokens(k), _tokens(v), block.cu_q, block.cu_k, block.max_q, block.max_k, 0.0, block.causal,
        False, scale=scale)
    # the varlen LSE is [heads, rows], unpadded
    return out.transpose(0, 1).unsqueeze(0), lse.view(1, q.size(1), q.size(2))


def _varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, block: Block,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed = torch.empty((), dtype=torch.int64, device=q.device)  # (no dropout: the kernel reads no RNG state)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        _tokens(dout), _tokens(q), _tokens(k), _tokens(v), _tokens(out), lse[0].contiguous(), block.cu_q, block.cu_k,
        block.max_q, block.max_k, 0.0, block.causal, seed, seed, scale=scale)
    return tuple(g.transpose(0, 1).unsqueeze(0) for g in (dq, dk, dv))


def segment_mask(block: Block, dtype: torch.dtype) -> torch.Tensor:
    """A varlen block as an additive [rows, keys] mask, for the kernels without varlen: 0 where a
    row and a key are in the same segment (and, causally, the key is not after the row), a large
    negative number elsewhere. Every row sees a key (its segment's first)."""
    cu_q, cu_k = block.cu_q.to(torch.long), block.cu_k.to(torch.long)
    rows, keys = int(cu_q[-1]), int(cu_k[-1])
    segments = torch.arange(cu_q.numel() - 1, device=cu_q.device)
    q_seg = torch.repeat_interleave(segments, cu_q[1:] - cu_q[:-1], output_size=rows)
    k_seg = torch.repeat_interleave(segments, cu_k[1:] - cu_k[:-1], output_size=keys)
    seen = q_seg[:, None] == k_seg[None, :]
    if block.causal:
        q_pos = torch.arange(rows, device=cu_q.device) - cu_q[q_seg]
        k_pos = torch.arange(keys, device=cu_k.device) - cu_k[k_seg]
        seen &= k_pos[None, :] <= q_pos[:, None]
    mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min / 2)


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
        rows = block.rows
        o, l = block_forward(q[:, :, rows], k[:, :, block.keys], v[:, :, block.keys], block, scale)
        acc_out, acc_lse = out[:, :, rows], lse[:, :, rows]  # (copies where rows is an index)
        merged = torch.logaddexp(acc_lse, l)
        out[:, :, rows] = acc_out * torch.exp(acc_lse - merged).unsqueeze(-1) \
            + o.float() * torch.exp(l - merged).unsqueeze(-1)
        lse[:, :, rows] = merged


def backward_blocks(dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, blocks: list[Block], dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                    scale: float) -> None:
    """Add the blocks' gradients into the fp32 `dq` (rows) and `dk`, `dv` (keys)."""
    for block in blocks:
        rows, keys = block.rows, block.keys
        gq, gk, gv = block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                                    lse[:, :, rows], block, scale)
        for grad, index, part in ((dq, rows, gq), (dk, keys, gk), (dv, keys, gv)):
            if isinstance(index, slice):
                grad[:, :, index] += part
            else:  # an index may repeat (a key in two segments): its parts add up
                grad.index_add_(2, index, part.to(grad.dtype))


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


def _ring_plan(rank: int, cp: int, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[list[Block]]:
    """The blocks of each ring step's source rank (packed rows: built once, forward and backward)."""
    if cu_seqlens is None:
        return [ring_blocks(rank, source, cp, q.size(2) // 2) for source in range(cp)]
    return packed_ring_blocks(rank, cp, cu_seqlens, q.device)


class RingAttention(torch.autograd.Function):
    """Ring mode; q, k, v: this rank's [b, h, 2c, d] (k, v may have fewer heads); `plan`:
    attention_plan's blocks per source rank."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                scale: float, plan: list[list[Block]]) -> torch.Tensor:
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        ring = _Ring(group)
        out, lse = _accumulators(q)
        kv = torch.stack([k, v])
        for step in range(cp):
            if step < cp - 1:  # the next block travels while this one is computed
                incoming, requests = ring.start(kv)
            forward_blocks(q, kv[0], kv[1], plan[(rank - step) % cp], out, lse, scale)
            if step < cp - 1:
                ring.wait(requests)
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.plan = group, scale, plan
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, plan = ctx.group, ctx.scale, ctx.plan
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
            backward_blocks(dout, q, out, lse, kv[0], kv[1], plan[(rank - step) % cp], dq, dkv[0], dkv[1], scale)
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


def _allgather_plan(rank: int, cp: int, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[Block]:
    if cu_seqlens is None:
        return allgather_blocks(rank, cp, q.size(2) // 2)
    return packed_allgather_blocks(rank, cp, cu_seqlens, q.size(2), q.device)


class AllGatherAttention(torch.autograd.Function):
    """All-gather mode; q, k, v: this rank's [b, h, 2c, d] (k, v may have fewer heads); `blocks`:
    attention_plan's; `packed`: packed rows (b = 1)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                scale: float, blocks: list[Block], packed: bool) -> torch.Tensor:
        kv = gathered_keys(_all_gather(torch.stack([k, v]), group), packed)
        out, lse = _accumulators(q)
        forward_blocks(q, kv[0], kv[1], blocks, out, lse, scale)
        out = out.to(q.dtype)
        # The gathered K/V is not kept: backward gathers it again.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.blocks, ctx.packed = group, scale, blocks, packed
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, blocks, packed = ctx.group, ctx.scale, ctx.blocks, ctx.packed
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        kv = gathered_keys(_all_gather(torch.stack([k, v]), group), packed)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        backward_blocks(dout.contiguous(), q, out, lse, kv[0], kv[1], blocks, dq, dkv[0], dkv[1], scale)
        dkv = _reduce_scatter(scattered_keys(dkv, cp, packed).contiguous(), group)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def attention_plan(mode: str, rank: int, cp: int, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list:
    """The blocks rank `rank` runs for q ([b, h, 2c, d]): ring mode, a list per source rank;
    all-gather mode, one list. Packed rows: `cu_seqlens` as context_parallel_attention takes it."""
    if mode not in MODES:
        raise ValueError(f"unknown context-parallel attention mode {mode!r} (ring | allgather)")
    return (_ring_plan if mode == "ring" else _allgather_plan)(rank, cp, q, cu_seqlens)


class _LastPlan:
    """The last packed plan built, by the batch's cu_seqlens tensor (held weakly: a new batch's
    tensor never matches a freed one) and its version. Every layer of a micro batch attends over
    the same documents; building the plan copies the boundaries to the host and the blocks' indices
    back, each a wait for the GPU, so it is built once per micro batch rather than once per layer."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._source: Any = None
        self._plan: list | None = None

    def get(self, source: torch.Tensor, key: tuple, build: Callable[[], list]) -> list:
        if self._source is not None and self._source() is source and self._key == (source._version, *key):
            return self._plan
        self._plan = build()
        self._source, self._key = weakref.ref(source), (source._version, *key)
        return self._plan


_last_plan = _LastPlan()


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                               mode: str, scale: float | None = None,
                               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this CP rank's two query chunks over the whole sequence.
    q: [b, heads, 2c, d]; k, v: [b, kv_heads, 2c, d]; returns [b, heads, 2c, d]. Packed rows:
    b = 1, `cu_seqlens` this rank's cumulative document lengths (the same on every rank), and
    attention stays inside each document."""
    plan = attention_plan(mode, dist.get_rank(group), dist.get_world_size(group), q, cu_seqlens)
    return _attend(q, k, v, group, mode, scale, plan, packed=cu_seqlens is not None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, mode: str,
            scale: float | None, plan: list, packed: bool) -> torch.Tensor:
    scale = q.size(-1) ** -0.5 if scale is None else scale
    if mode == "ring":
        return RingAttention.apply(q, k, v, group, scale, plan)
    return AllGatherAttention.apply(q, k, v, group, scale, plan, packed)


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
        stream_cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        rank, cp = dist.get_rank(self.group), dist.get_world_size(self.group)
        # [t, heads, d] -> [1, heads, t, d]
        q, k, v = (t.reshape(t.size(0), t.size(-2), t.size(-1)).transpose(0, 1).unsqueeze(0)
                   for t in (query, key, value))
        # this rank's share of each document: 1/cp of it
        plan = _last_plan.get(stream_cu, (self.mode, rank, cp, q.shape, q.device), lambda: attention_plan(
            self.mode, rank, cp, q, torch.div(stream_cu, cp, rounding_mode="floor")))
        out = _attend(q, k, v, self.group, self.mode, self.softmax_scale, plan, packed=True)
        # [1, heads, t, d] -> [t, heads * d]
        return out.squeeze(0).transpose(0, 1).reshape(out.size(2), -1)
