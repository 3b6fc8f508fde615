"""Pretraining over indexed data: windows, weighted blends, Megatron's EOD options, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.data.gpt_dataset import BlendedDataset, IndexedWindows, blend_schedule, pretrain_microbatches
from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter

EOD = 1


def make_dataset(path, base, n_docs, seed):
    """Documents of tokens base + k (k >= 2) ending in EOD: every window tells which dataset it came from."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(path, np.int32) as w:
        for _ in range(n_docs):
            n = int(rng.integers(1, 20))
            w.add(np.concatenate([base + 2 + rng.integers(0, 100, n), [EOD]]))
        w.finalize()
    return IndexedDataset(path)


@pytest.fixture
def sources(tmp_path):
    return [make_dataset(tmp_path / f"d{k}", 1000 * (k + 1), 300 + 100 * k, k) for k in range(3)]


def which(window):
    return {int(t) // 1000 - 1 for t in window if t != EOD}


def test_windows_cover_the_stream_each_epoch(sources):
    seq = 16
    w = IndexedWindows(sources[0], seq, seed=2)
    flat = np.asarray(sources[0].tokens, dtype=np.int64)
    starts = []
    for i in range(2 * len(w)):
        win = w[i]
        s = next(s for s in range(0, len(flat) - seq, seq) if np.array_equal(flat[s:s + seq + 1], win))
        starts.append(s // seq)
    assert sorted(starts[:len(w)]) == sorted(starts[len(w):]) == list(range(len(w)))
    assert starts[:len(w)] != starts[len(w):]


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1, 8], [2, 0, 1]])
def test_blend_proportions_match_weights(sources, weights):
    seq = 8
    blend = BlendedDataset([IndexedWindows(s, seq, seed=k) for k, s in enumerate(sources)], weights, block=100)
    n = 3000  # past several epochs of the smaller sources
    counts = np.zeros(3)
    for i in range(n):
        got = which(blend[i])
        assert len(got) == 1  # each sample from one source
        counts[got.pop()] += 1
    share = np.asarray(weights, dtype=float) / sum(weights)
    assert np.abs(counts / n - share).max() <= 0.01
    # Any window of 100 consecutive samples is within one sample of the weights.
    first = [which(blend[i]).pop() for i in range(100)]
    assert np.abs(np.bincount(first, minlength=3) - 100 * share).max() <= 1


def test_blend_streams_are_the_sources_own_streams(sources):
    windows = [IndexedWindows(s, 8, seed=k) for k, s in enumerate(sources)]
    blend = BlendedDataset(windows, [0.25, 0.75, 0], block=8)
    taken = [[], [], []]
    for i in range(200):
        d, k = blend.source(i)
        taken[d].append(k)
        assert np.array_equal(blend[i], windows[d][k])
    assert taken[0] == list(range(50)) and taken[1] == list(range(150)) and taken[2] == []


def test_blend_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        blend_schedule([1, -1], 10)
    with pytest.raises(ValueError, match=r"dataset\(s\) \[1\] get no sample"):
        blend_schedule([1000, 1], 10)


def megatron_reference(tokens, reset_position_ids, reset_attention_mask, eod_mask_loss):
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    return _get_ltor_masks_and_position_ids(tokens, EOD, reset_position_ids, reset_attention_mask, eod_mask_loss,
                                            create_attention_mask=True)


def block_causal(cu, seq, row):
    """Attention allowed (True) from query i to key j of row `row` under document boundaries cu."""
    seg = torch.bucketize(torch.arange(row * seq, (row + 1) * seq), cu[1:].long(), right=True)
    return (seg[:, None] == seg[None, :]) & torch.tril(torch.ones(seq, seq, dtype=torch.bool))


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)])
def test_eod_options_match_megatron(sources, flags):
    seq = 32
    ds = IndexedWindows(sources[0], seq, seed=0)
    batches = pretrain_microbatches(ds, step=1, dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=4,
                                    eod_id=EOD, reset_position_ids=flags[0], reset_attention_mask=flags[1],
                                    eod_mask_loss=flags[2])
    for b in batches:
        for r in range(2):
            mask, loss_mask, positions = megatron_reference(b["tokens"][r], *flags)
            assert torch.equal(b["loss_mask"][r], loss_mask)
            assert torch.equal(b["position_ids"][r], positions)
            if flags[1]:
                assert torch.equal(block_causal(b["cu_seqlens"], seq, r), ~mask[0])
                assert b["max_seqlen"] == int((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).max())
            else:
                assert "cu_seqlens" not in b
        assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])


def test_eod_options_need_an_eod_id(sources):
    with pytest.raises(ValueError, match="EOD id"):
        pretrain_microbatches(IndexedWindows(sources[0], 8, 0), step=0, dp_rank=0, dp_size=1, micro_batch_size=1,
                              global_batch_size=1, eod_mask_loss=True)


def test_resume_mid_epoch_continues_the_blended_stream(sources):
    seq, gbs = 16, 8
    windows0 = len(IndexedWindows(sources[0], seq, seed=0))
    assert windows0 < 60 * gbs * 3 // 6  # the 60 steps below run source 0 into its second epoch

    def stream(steps, dp_size):
        blend = BlendedDataset([IndexedWindows(s, seq, seed=k + 7) for k, s in enumerate(sources)], [3, 2, 1])
        out = []
        for s in steps:
            ranks = [pretrain_microbatches(blend, step=s, dp_rank=r, dp_size=dp_size, micro_batch_size=2,
                                           global_batch_size=gbs, eod_id=EOD, reset_position_ids=True)
                     for r in range(dp_size)]
            out.append(torch.cat([b["tokens"] for r in ranks for b in r]))
        return out

    uninterrupted = stream(range(60), 1)
    resumed = stream(range(41, 60), 2)  # a fresh run (another DP size) resuming at step 41
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[41:], resumed))
    assert len({tuple(t.flatten().tolist()) for t in uninterrupted}) == 60
