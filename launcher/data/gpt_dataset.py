"""Pretraining over indexed datasets: fixed windows, weighted blends, Megatron's EOD options.

Windows: `IndexedWindows` cuts an indexed dataset's flat token stream (documents back to back,
each ending in EOD as `launcher.preprocess` and the default corpus write them) into windows of
seq_length + 1 tokens, in a seeded permutation per epoch. The stream is a pure function of
(seed, step): global batch `step` is a fixed set of samples whatever the data-parallel size
(`microbatches`), so layouts can be compared sample-for-sample and a resumed run continues
exactly where the checkpoint left off.

Blend: `BlendedDataset` interleaves several datasets by weight. Sample i's source is a pure
function of i: a fixed block of `block` slots is assigned greedily to the dataset furthest
behind its target share (Megatron's blending rule), and that block repeats. So every block
(and so every long enough stretch of steps) matches the weights to 1/block, and dataset d's
k-th sample is the k-th sample of its own seeded stream.

Micro batches: `microbatches` cuts step `step`'s global batch into this DP rank's micro batches;
`pretrain_microbatches` adds Megatron's `get_ltor_masks_and_position_ids` options:
  eod_mask_loss        no loss where the input token is EOD (do not learn to predict across documents)
  reset_position_ids   positions restart at 0 after every EOD
  reset_attention_mask no attention across EOD: emitted as document boundaries (`cu_seqlens`,
                       `max_seqlen`) in the packed micro-batch contract of `launcher.data.packing`
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from launcher.data.indexed import IndexedDataset


class WindowDataset(Protocol):
    seq_length: int

    def __getitem__(self, i: int) -> np.ndarray: ...


class IndexedWindows:
    """Fixed windows of seq_length + 1 tokens over an indexed dataset's token stream, in a seeded order per epoch.

    Window c covers tokens [c*S, c*S + S]: consecutive windows share one token, as in
    Megatron's GPT dataset, so every token is a label exactly once per epoch.
    """

    def __init__(self, dataset: IndexedDataset, seq_length: int, seed: int) -> None:
        self.dataset = dataset
        self.seq_length = seq_length
        self.seed = seed
        self._num = (len(dataset.tokens) - 1) // seq_length
        if self._num < 1:
            raise ValueError(f"{dataset.prefix}: {len(dataset.tokens)} tokens, fewer than one window of "
                             f"seq_length + 1 = {seq_length + 1}")
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, i: int) -> np.ndarray:
        """Global sample i (any non-negative int; indices past the end run into the next epochs)."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, position = divmod(int(i), self._num)
        # Consecutive samples usually share an epoch: keep the last permutation instead of redrawing it.
        if epoch != self._perm_epoch:
            # (seed, epoch) as separate entropy words: seed + epoch would make seed 1 / epoch 0 equal seed 0 / epoch 1.
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._num)
            self._perm_epoch = epoch
        start = int(self._perm[position]) * self.seq_length
        return np.asarray(self.dataset.tokens[start:start + self.seq_length + 1], dtype=np.int64)


def blend_schedule(weights: Sequence[float], block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source of each slot, index of the slot within its source, slots per source) for one block."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    source = np.empty(block, dtype=np.int64)
    local = np.empty(block, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    for slot in range(block):
        d = int(np.argmax(w * (slot + 1) - counts))  # furthest behind its share; argmax ties → lowest index
        source[slot], local[slot] = d, counts[d]
        counts[d] += 1
    starved = [i for i in range(len(w)) if w[i] > 0 and counts[i] == 0]
    if starved:
        raise ValueError(f"blend weights {list(weights)}: dataset(s) {starved} get no sample per block of {block}")
    return source, local, counts


class BlendedDataset:
    """Sample i of a weighted blend of datasets (any with __getitem__ over all i >= 0)."""

    def __init__(self, datasets: Sequence[WindowDataset], weights: Sequence[float], block: int = 1000) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} blend weights")
        self.datasets = list(datasets)
        self.seq_length = datasets[0].seq_length
        self.block = block
        self._source, self._local, self._counts = blend_schedule(weights, block)

    def source(self, i: int) -> tuple[int, int]:
        """(dataset, index in that dataset) of blended sample i."""
        b, slot = divmod(int(i), self.block)
        d = int(self._source[slot])
        return d, b * int(self._counts[d]) + int(self._local[slot])

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        d, k = self.source(i)
        return self.datasets[d][k]


def document_boundaries(tokens: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the flattened [mbs, S] tokens: a document ends after each EOD and at each row end."""
    mbs, seq = tokens.shape
    bounds = [0]
    for r in range(mbs):
        ends = (torch.nonzero(tokens[r] == eod_id).flatten() + 1).tolist()
        bounds += [r * seq + e for e in ends if e < seq] + [(r + 1) * seq]
    cu = torch.tensor(bounds, dtype=torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def microbatches(dataset: WindowDataset, *, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                 global_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro batches of optimizer step `step` (0-based) over a window dataset.

    The global batch is samples [step*G, (step+1)*G); rank r takes the contiguous slice
    [r*G/dp, (r+1)*G/dp), so concatenating the ranks gives the dp=1 batch.
    """
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size} x "
                         f"micro_batch_size {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    seq = dataset.seq_length
    positions = torch.arange(seq, dtype=torch.long).unsqueeze(0).repeat(micro_batch_size, 1)
    batches = []
    for start in range(first, first + per_rank, micro_batch_size):
        windows = torch.from_numpy(np.stack([dataset[i] for i in range(start, start + micro_batch_size)]))
        batches.append({
            "tokens": windows[:, :-1].contiguous(),
            "labels": windows[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch_size, seq, dtype=torch.float32),
            "position_ids": positions.clone(),  # clone: a consumer may modify one micro batch in place
        })
    return batches


def pretrain_microbatches(dataset: WindowDataset, *, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                          global_batch_size: int, eod_id: int | None = None, reset_position_ids: bool = False,
                          reset_attention_mask: bool = False,
                          eod_mask_loss: bool = False) -> list[dict[str, torch.Tensor | int]]:
    """`microbatches` plus Megatron's EOD options (module docstring)."""
    if (reset_position_ids or reset_attention_mask or eod_mask_loss) and eod_id is None:
        raise ValueError("reset_position_ids / reset_attention_mask / eod_mask_loss need the tokenizer's EOD id, "
                         "and the tokenizer has none")
    batches: list[dict[str, torch.Tensor | int]] = []
    for b in microbatches(dataset, step=step, dp_rank=dp_rank, dp_size=dp_size,
                          micro_batch_size=micro_batch_size, global_batch_size=global_batch_size):
        tokens = b["tokens"]
        is_eod = tokens == eod_id if eod_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
        if eod_mask_loss:
            b["loss_mask"][is_eod] = 0.0
        if reset_position_ids:
            # Position = distance from the last EOD before it (exclusive), computed with a running max.
            idx = torch.arange(tokens.shape[1]).expand_as(tokens)
            doc_start = torch.where(is_eod, idx + 1, torch.zeros_like(idx))
            doc_start = torch.cummax(torch.cat([torch.zeros_like(idx[:, :1]), doc_start[:, :-1]], 1), 1).values
            b["position_ids"] = idx - doc_start
        if reset_attention_mask:
            b["cu_seqlens"], b["max_seqlen"] = document_boundaries(tokens, eod_id)  # type: ignore[arg-type]
        batches.append(b)
    return batches
