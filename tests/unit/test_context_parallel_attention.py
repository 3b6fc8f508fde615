"""models/kernels/context_parallel_attention.py, the math without a process group: cp ranks
emulated one after another on one process (each rank's two chunks, the blocks of its ring steps
or of its gathered prefix, merged by log-sum-exp; block gradients summed per K/V owner), against
torch's plain causal attention of the whole sequence, forward and backward, fp32, within 1e-6.
The process-group plumbing (P2P ring, all-gather, reduce-scatter) is tests/dist/test_context_parallel.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels import context_parallel_attention as cpa


def _rank_chunks(x: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """This rank's two chunks (r, 2cp-1-r) of [b, h, s, d], as the batch split gives them."""
    chunks = x.chunk(2 * cp, dim=2)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=2)


def _emulate(mode: str, q, k, v, dout, cp: int, scale: float):
    """Every rank's output and gradients, assembled in sequence order."""
    chunk = q.size(2) // (2 * cp)
    qs, ks, vs, douts = ([_rank_chunks(x, r, cp) for r in range(cp)] for x in (q, k, v, dout))
    outs, lses = [], []
    for r in range(cp):  # forward: every rank's blocks
        out, lse = cpa._accumulators(qs[r])
        if mode == "ring":
            for step in range(cp):
                src = (r - step) % cp
                cpa.forward_blocks(qs[r], ks[src], vs[src], cpa.ring_blocks(r, src, cp, chunk), out, lse, scale)
        else:
            full_k, full_v = (cpa.to_sequence_order(torch.stack(x)) for x in (ks, vs))
            cpa.forward_blocks(qs[r], full_k, full_v, cpa.allgather_blocks(r, cp, chunk), out, lse, scale)
        outs.append(out.to(q.dtype))  # (as the autograd Functions keep it for backward)
        lses.append(lse)
    dqs = [torch.zeros_like(x, dtype=torch.float32) for x in qs]  # gradients add up in fp32, as there
    if mode == "ring":  # K/V gradients summed at their owner, as the ring brings them home
        dks, dvs = ([torch.zeros_like(x, dtype=torch.float32) for x in xs] for xs in (ks, vs))
        for r in range(cp):
            for step in range(cp):
                src = (r - step) % cp
                cpa.backward_blocks(douts[r], qs[r], outs[r], lses[r], ks[src], vs[src],
                                    cpa.ring_blocks(r, src, cp, chunk), dqs[r], dks[src], dvs[src], scale)
    else:  # gradients over the gathered K/V, summed over ranks (the reduce-scatter)
        full_k, full_v = (cpa.to_sequence_order(torch.stack(x)) for x in (ks, vs))
        dk_full, dv_full = (torch.zeros_like(x, dtype=torch.float32) for x in (full_k, full_v))
        for r in range(cp):
            cpa.backward_blocks(douts[r], qs[r], outs[r], lses[r], full_k, full_v, cpa.allgather_blocks(r, cp, chunk),
                                dqs[r], dk_full, dv_full, scale)
        dks, dvs = list(cpa.from_sequence_order(dk_full, cp)), list(cpa.from_sequence_order(dv_full, cp))
    return tuple(cpa.to_sequence_order(torch.stack(x)) for x in (outs, dqs, dks, dvs))


@pytest.mark.parametrize("mode", cpa.MODES)
@pytest.mark.parametrize("cp,heads,kv_heads", [(1, 4, 4), (2, 4, 2), (3, 4, 1), (4, 4, 4)],
                         ids=["cp1", "cp2-gqa", "cp3-mqa", "cp4"])
def test_matches_full_causal_attention(mode, cp, heads, kv_heads):
    g = torch.Generator().manual_seed(cp)
    b, s, d = 2, 2 * cp * 5, 16
    q = torch.randn(b, heads, s, d, generator=g, requires_grad=True)
    k = torch.randn(b, kv_heads, s, d, generator=g, requires_grad=True)
    v = torch.randn(b, kv_heads, s, d, generator=g, requires_grad=True)
    dout = torch.randn(b, heads, s, d, generator=g)
    scale = 0.3
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=kv_heads != heads)
    ref.backward(dout)
    with torch.no_grad():
        got = _emulate(mode, q, k, v, dout, cp, scale)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, (ref, q.grad, k.grad, v.grad)):
        # fp32 with another summation order than the reference kernel: rounding differs with the CPU
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_blocks_cover_the_causal_mask_once(cp):
    """Over all ranks, the blocks of either mode cover each (query, key) pair with j <= i exactly once."""
    chunk = 3
    s = 2 * cp * chunk
    position = torch.arange(s).view(2 * cp, chunk)
    causal = torch.tril(torch.ones(s, s, dtype=torch.int))
    for mode in cpa.MODES:
        cover = torch.zeros(s, s, dtype=torch.int)
        for r in range(cp):
            rows = torch.cat([position[r], position[2 * cp - 1 - r]])
            sources = [(src, torch.cat([position[src], position[2 * cp - 1 - src]])) for src in range(cp)] \
                if mode == "ring" else [(None, torch.arange(s))]
            for src, keys in sources:
                blocks = cpa.ring_blocks(r, src, cp, chunk) if mode == "ring" else cpa.allgather_blocks(r, cp, chunk)
                for block in blocks:
                    qi, kj = rows[block.rows], keys[block.keys]
                    part = torch.ones(len(qi), len(kj), dtype=torch.int)
                    if block.causal:
                        part = torch.tril(part)
                    cover[qi[:, None], kj[None, :]] += part
        assert torch.equal(cover, causal), mode


def test_sequence_order_round_trip():
    x = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4, 1)  # cp=3, chunks of 2
    full = cpa.to_sequence_order(x)
    assert full.shape == (2, 12, 1)
    assert torch.equal(cpa.from_sequence_order(full, 3), x)
    # rank 1's first chunk is chunk 1, its second chunk 4
    assert torch.equal(full[:, 2:4], x[1, :, 0:2]) and torch.equal(full[:, 8:10], x[1, :, 2:4])


# Packed rows (THD): documents of any length in one stream, each padded to a multiple of 2·cp and
# split per document by the engine's batch split, attention masked per document on every rank.

def _emulate_packed(mode: str, q, k, v, dout, cu_seqlens, cp: int, scale: float):
    """Every rank's output and gradients over the unpadded stream (padding dropped), each rank's
    share taken by parallel.engine.packed_split; the padding carries no gradient into the output."""
    from parallel.engine import packed_split

    splits = [packed_split(cu_seqlens, cp, r) for r in range(cp)]
    cu_local = splits[0][1] // cp

    def share(x, r):  # [1, h, T, d] -> this rank's [1, h, total, d], zeros at the padding
        index = splits[r][0]
        index = index.to(x.device)
        return torch.where((index >= 0)[:, None], x[:, :, index.clamp(min=0)], torch.zeros((), dtype=x.dtype,
                                                                                           device=x.device))

    qs, ks, vs, douts = ([share(x, r) for r in range(cp)] for x in (q, k, v, dout))
    outs, lses = [], []
    for r in range(cp):
        out, lse = cpa._accumulators(qs[r])
        if mode == "ring":
            for step in range(cp):
                src = (r - step) % cp
                cpa.forward_blocks(qs[r], ks[src], vs[src], cpa.packed_ring_blocks(r, src, cp, cu_local, qs[r]),
                                   out, lse, scale)
        else:
            full_k, full_v = (cpa.gathered_keys(torch.stack(x), packed=True) for x in (ks, vs))
            cpa.forward_blocks(qs[r], full_k, full_v, cpa.packed_allgather_blocks(r, cp, cu_local, qs[r]),
                               out, lse, scale)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dqs = [torch.zeros_like(x, dtype=torch.float32) for x in qs]  # gradients add up in fp32, as there
    dks, dvs = ([torch.zeros_like(x, dtype=torch.float32) for x in xs] for xs in (ks, vs))
    if mode == "ring":
        for r in range(cp):
            for step in range(cp):
                src = (r - step) % cp
                cpa.backward_blocks(douts[r], qs[r], outs[r], lses[r], ks[src], vs[src],
                                    cpa.packed_ring_blocks(r, src, cp, cu_local, qs[r]),
                                    dqs[r], dks[src], dvs[src], scale)
    else:
        full_k, full_v = (cpa.gathered_keys(torch.stack(x), packed=True) for x in (ks, vs))
        dk_full, dv_full = (torch.zeros_like(x, dtype=torch.float32) for x in (full_k, full_v))
        for r in range(cp):
            cpa.backward_blocks(douts[r], qs[r], outs[r], lses[r], full_k, full_v,
                                cpa.packed_allgather_blocks(r, cp, cu_local, qs[r]), dqs[r], dk_full, dv_full,
                                scale)
        dks, dvs = list(cpa.scattered_keys(dk_full, cp, True)), list(cpa.scattered_keys(dv_full, cp, True))

    def whole(parts, like):  # the ranks' shares back into the unpadded stream
        full = torch.zeros(like.shape[:2] + (like.size(2), parts[0].size(-1)), dtype=parts[0].dtype,
                           device=like.device)
        for r, part in enumerate(parts):
            index = splits[r][0].to(like.device)
            full[:, :, index[index >= 0]] = part[:, :, index >= 0]
        return full

    return whole(outs, q), whole(dqs, q), whole(dks, k), whole(dvs, v)


@pytest.mark.parametrize("mode", cpa.MODES)
@pytest.mark.parametrize("cp,heads,kv_heads,lengths", [
    (1, 4, 4, [5, 3, 8]),
    (2, 4, 2, [8, 3, 1, 13, 4]),       # documents shorter than 2·cp, and not multiples of it
    (3, 4, 1, [12, 7, 2, 6]),
    (4, 4, 4, [1, 16, 9, 2, 8, 31]),
], ids=["cp1", "cp2-gqa", "cp3-mqa", "cp4"])
def test_packed_matches_block_diagonal_attention(mode, cp, heads, kv_heads, lengths):
    from models.kernels.attention import block_causal_mask

    g = torch.Generator().manual_seed(10 + cp)
    total, d = sum(lengths), 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, heads, total, d, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, total, d, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, total, d, generator=g, requires_grad=True)
    dout = torch.randn(1, heads, total, d, generator=g)
    scale = 0.3
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(cu, total, q.device), scale=scale,
                                         enable_gqa=kv_heads != heads)
    ref.backward(dout)
    with torch.no_grad():
        got = _emulate_packed(mode, q, k, v, dout, cu, cp, scale)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, (ref, q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_packed_split_pads_each_document_and_takes_its_balanced_chunks():
    from parallel.engine import packed_split

    # documents of 5 and 8 tokens, cp=2: padded to 8 and 8, chunks of 2
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    index0, cu_padded = packed_split(cu, 2, 0)
    index1, _ = packed_split(cu, 2, 1)
    assert cu_padded.tolist() == [0, 8, 16]
    # rank 0: chunks 0 and 3 of each document; rank 1: chunks 1 and 2 (-1: padding)
    assert index0.tolist() == [0, 1, -1, -1, 5, 6, 11, 12]
    assert index1.tolist() == [2, 3, 4, -1, 7, 8, 9, 10]
    # a rank's share split over 3 sequence-parallel ranks: the last document padded to chunks of 4
    index0, cu_padded = packed_split(cu, 2, 0, share_multiple=3)
    assert cu_padded.tolist() == [0, 8, 24]
    assert index0.tolist() == [0, 1, -1, -1, 5, 6, 7, 8, -1, -1, -1, -1]
    assert packed_split(cu, 2, 0, share_multiple=4)[1].tolist() == [0, 8, 16]  # 8 tokens a rank already
