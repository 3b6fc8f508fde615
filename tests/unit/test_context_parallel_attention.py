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
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


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
