"""models/kernels/context_parallel_attention.py, the math without a process group: cp ranks
emulated one after another on one process (each rank's two chunks, the blocks of its ring steps
or of its gathered prefix, merged by log-sum-exp; block gradients summed per K/V owner), against
torch's plain causal attention of the whole sequence (packed rows: block-diagonal attention of
the whole stream), forward and backward, fp32, within 1e-5.
The process-group plumbing (P2P ring, all-gather, reduce-scatter) runs in tests/dist/test_parity.py (its cp layouts)."""
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
# split per document by the engine's batch split, attention as varlen blocks per document on every
# rank (here each block runs under its segment mask through the CPU kernel).

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
    total = qs[0].size(2)
    if mode == "ring":  # each rank's blocks per source rank
        plans = [cpa.packed_ring_blocks(r, cp, cu_local, q.device) for r in range(cp)]
    else:
        plans = [cpa.packed_allgather_blocks(r, cp, cu_local, total, q.device) for r in range(cp)]
    outs, lses = [], []
    for r in range(cp):
        out, lse = cpa._accumulators(qs[r])
        if mode == "ring":
            for step in range(cp):
                src = (r - step) % cp
                cpa.forward_blocks(qs[r], ks[src], vs[src], plans[r][src], out, lse, scale)
        else:
            full_k, full_v = (cpa.gathered_keys(torch.stack(x), packed=True) for x in (ks, vs))
            cpa.forward_blocks(qs[r], full_k, full_v, plans[r], out, lse, scale)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dqs = [torch.zeros_like(x, dtype=torch.float32) for x in qs]  # gradients add up in fp32, as there
    dks, dvs = ([torch.zeros_like(x, dtype=torch.float32) for x in xs] for xs in (ks, vs))
    if mode == "ring":
        for r in range(cp):
            for step in range(cp):
                src = (r - step) % cp
                cpa.backward_blocks(douts[r], qs[r], outs[r], lses[r], ks[src], vs[src], plans[r][src],
                                    dqs[r], dks[src], dvs[src], scale)
    else:
        full_k, full_v = (cpa.gathered_keys(torch.stack(x), packed=True) for x in (ks, vs))
        dk_full, dv_full = (torch.zeros_like(x, dtype=torch.float32) for x in (full_k, full_v))
        for r in range(cp):
            cpa.backward_blocks(douts[r], qs[r], outs[r], lses[r], full_k, full_v, plans[r], dqs[r], dk_full,
                                dv_full, scale)
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
    (2, 4, 2, [1, 3, 2, 4, 1]),        # every document one chunk a rank (the kernels' one-row segments)
    (4, 4, 2, [5, 0, 1, 23, 8, 0]),    # empty documents
], ids=["cp1", "cp2-gqa", "cp3-mqa", "cp4", "cp2-tiny", "cp4-gqa-empty"])
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
        # fp32, summed over more blocks than the reference's one kernel: rounding as in the dense test
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cp,lengths", [(1, [3, 4]), (2, [8, 3, 1, 13, 0, 4]), (3, [12, 7, 2, 6]),
                                        (4, [1, 16, 9, 2, 8, 31])])
def test_packed_blocks_cover_the_block_diagonal_causal_mask_once(cp, lengths):
    """Over all ranks, the packed blocks of either mode cover each (query, key) pair of the padded
    stream's block-diagonal causal mask exactly once: segment i of a block's rows against segment i
    of its keys, all of it, or its lower triangle for a causal block, whose segments are square."""
    from models.kernels.attention import block_causal_mask
    from parallel.engine import packed_split

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_padded = packed_split(cu, cp, 0)[1]
    cu_local = cu_padded // cp
    total = int(cu_local[-1])
    padded = int(cu_padded[-1])

    def stream_positions(rank):  # each of a rank's rows' position in the padded stream
        rows = []
        for i in range(len(lengths)):
            c = int(cu_local[i + 1] - cu_local[i]) // 2
            rows += [int(cu_padded[i]) + rank * c + w for w in range(c)]
            rows += [int(cu_padded[i]) + (2 * cp - 1 - rank) * c + w for w in range(c)]
        return torch.tensor(rows, dtype=torch.long)

    positions = [stream_positions(r) for r in range(cp)]
    for mode in cpa.MODES:
        cover = torch.zeros(padded, padded, dtype=torch.int)
        for r in range(cp):
            if mode == "ring":
                plan = cpa.packed_ring_blocks(r, cp, cu_local, torch.device("cpu"))
                sources = [(plan[s], positions[s]) for s in range(cp)]
            else:
                sources = [(cpa.packed_allgather_blocks(r, cp, cu_local, total, torch.device("cpu")),
                            torch.cat(positions))]
            for blocks, keys in sources:
                for block in blocks:
                    qi, kj = positions[r][block.rows], keys[block.keys]
                    assert (qi.numel(), kj.numel()) == (block.cu_q[-1], block.cu_k[-1])
                    segments = zip(block.cu_q[:-1].tolist(), block.cu_q[1:].tolist(),
                                   block.cu_k[:-1].tolist(), block.cu_k[1:].tolist())
                    for q0, q1, k0, k1 in segments:
                        assert 0 < q1 - q0 <= block.max_q and 0 < k1 - k0 <= block.max_k
                        part = torch.ones(q1 - q0, k1 - k0, dtype=torch.int)
                        if block.causal:
                            assert q1 - q0 == k1 - k0
                            part = torch.tril(part)
                        cover[qi[q0:q1, None], kj[None, k0:k1]] += part
        assert torch.equal(cover, block_causal_mask(cu_padded, padded, "cpu").int()), mode


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


# The CUDA varlen path's glue (row layout, LSE layout, GQA, cumulative lengths) on CPU: torch's
# varlen flash ops replaced by plain-torch stand-ins with their contract ([tokens, heads, d] rows,
# int32 cumulative lengths, an unpadded [heads, tokens] LSE, square causal segments; the backward
# takes the given output and LSE as they are), which check what they are given.

def _check_varlen_args(q, k, v, cu_q, cu_k, max_q, max_k):
    assert q.dim() == k.dim() == v.dim() == 3 and q.size(1) % k.size(1) == 0
    assert all(x.stride(-1) == 1 for x in (q, k, v))
    for cu, x, most in ((cu_q, q, max_q), (cu_k, k, max_k)):
        assert cu.dtype == torch.int32 and cu.is_contiguous() and cu.device == x.device
        lengths = cu[1:] - cu[:-1]
        assert int(cu[0]) == 0 and int(cu[-1]) == x.size(0) and int(lengths.min()) > 0 and int(lengths.max()) <= most
    assert cu_q.numel() == cu_k.numel()


def _segments(q, k, v, cu_q, cu_k, causal, scale):
    """Per segment: (row range, key range, probabilities-free pieces) in fp64."""
    groups = q.size(1) // k.size(1)
    for i in range(cu_q.numel() - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi = q[qs].double().transpose(0, 1)
        ki, vi = (x[ks].double().transpose(0, 1).repeat_interleave(groups, 0) for x in (k, v))
        scores = qi @ ki.transpose(1, 2) * scale
        if causal:
            assert qi.size(1) == ki.size(1), "a causal varlen segment must be square"
            scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
        yield qs, ks, qi, ki, vi, scores


def _fake_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale):
    _check_varlen_args(q, k, v, cu_q, cu_k, max_q, max_k)
    assert dropout_p == 0.0 and not return_debug_mask
    out = torch.empty_like(q)
    lse = torch.empty(q.size(1), q.size(0), dtype=torch.float32)
    for qs, _, _, _, vi, scores in _segments(q, k, v, cu_q, cu_k, is_causal, scale):
        lse[:, qs] = torch.logsumexp(scores, -1).float()
        out[qs] = (torch.softmax(scores, -1) @ vi).transpose(0, 1).to(q.dtype)
    seed = torch.empty((), dtype=torch.int64)
    return out, lse, seed, seed, torch.empty(0)


def _fake_flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, seed, offset, *,
                         scale):
    _check_varlen_args(q, k, v, cu_q, cu_k, max_q, max_k)
    assert dout.shape == out.shape == q.shape and dropout_p == 0.0
    assert lse.shape == (q.size(1), q.size(0)) and lse.dtype == torch.float32 and lse.is_contiguous()
    groups = q.size(1) // k.size(1)
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v))
    for qs, ks, qi, ki, vi, scores in _segments(q, k, v, cu_q, cu_k, is_causal, scale):
        p = torch.exp(scores - lse[:, qs, None].double())  # the given LSE, as the kernel does
        do, o = dout[qs].double().transpose(0, 1), out[qs].double().transpose(0, 1)
        ds = p * (do @ vi.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq[qs] += (ds @ ki * scale).transpose(0, 1)
        dk[ks] += (ds.transpose(1, 2) @ qi * scale).unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
        dv[ks] += (p.transpose(1, 2) @ do).unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
    return tuple(g.to(q.dtype) for g in (dq, dk, dv))


@pytest.mark.parametrize("mode", cpa.MODES)
@pytest.mark.parametrize("cp,heads,kv_heads,lengths", [
    (2, 4, 2, [8, 3, 1, 13, 4]),
    (2, 4, 2, [1, 3, 2, 4, 1]),
    (4, 4, 1, [5, 0, 1, 23, 8, 2]),
], ids=["cp2-gqa", "cp2-tiny", "cp4-mqa-empty"])
def test_packed_varlen_kernel_path_matches_block_diagonal_attention(monkeypatch, mode, cp, heads, kv_heads, lengths):
    from models.kernels.attention import block_causal_mask

    monkeypatch.setattr(cpa, "_flash_varlen", lambda q: True)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", _fake_flash_forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", _fake_flash_backward)
    g = torch.Generator().manual_seed(20 + cp)
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
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_packed_plan_is_built_once_per_batch_boundaries():
    """The layers of one micro batch share its cu_seqlens tensor and get one plan; the next batch's
    tensor (even with equal values), an in-place change, or another mode or shape build anew."""
    built = []

    def build():
        built.append(object())
        return [built[-1]]

    cache = cpa._LastPlan()
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    first = cache.get(cu, ("ring", 0, 2), build)
    assert cache.get(cu, ("ring", 0, 2), build) is first and len(built) == 1   # the next layer
    assert cache.get(cu, ("allgather", 0, 2), build) is not first               # another mode
    again = cu.clone()
    assert cache.get(again, ("allgather", 0, 2), build) is not built[1]         # the next batch
    again[1] = 4
    assert cache.get(again, ("allgather", 0, 2), build) is not built[2]         # changed in place
    assert len(built) == 4
