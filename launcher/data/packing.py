"""Sequence packing: variable-length samples → rows of exactly seq_length tokens.

Algorithms (all deterministic, ties broken by sample index):
  bfd    best-fit decreasing (default): longest sample first, each into the open row with the
         least room that still fits it.
  greedy first-fit in order: each sample, in dataset order, into the lowest-numbered row that fits.
  none   one sample per row (the padded baseline; same keys minus cu_seqlens).

Samples come from `SFTSamples`, already cut to seq_length (that is the truncation policy), so
every sample fits a row. A packed row holds whole documents followed by padding; a label never
crosses a document boundary (the last token of each document has loss 0), positions restart at
0 per document, and `cu_seqlens` are the cumulative document lengths with a trailing padding
segment so they end at seq_length.

Rows are packed once over the whole dataset; the order in which rows are consumed is a seeded
permutation per epoch, so the stream is a pure function of (seed, sample index) as for
`launcher.data.gpt_dataset.IndexedWindows`.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from launcher.data.sft import SFTSamples

ALGORITHMS = ("bfd", "greedy", "none")


def pack_bfd(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing; returns rows as lists of sample indices (each row in insertion order)."""
    rows: list[list[int]] = []
    room: list[int] = []  # sorted distinct free capacities that some open row has
    by_room: dict[int, list[int]] = {}  # free capacity → open rows with exactly that room
    order = np.argsort(-np.asarray(lengths), kind="stable")  # stable: equal lengths keep index order
    for i in order.tolist():
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than seq_length {capacity}")
        k = bisect.bisect_left(room, n)
        if k < len(room):  # the tightest row that fits
            free = room[k]
            row = by_room[free].pop()
            if not by_room[free]:
                del by_room[free]
                room.pop(k)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = free - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(room, left)
            by_room[left].append(row)
    return rows


def pack_first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First fit in dataset order, O(n log n) with a max segment tree over the rows' free room."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = np.full(2 * size, capacity, dtype=np.int64)  # leaves: free room of row j (unopened rows: all of it)
    rows: list[list[int]] = []
    for i in range(n):
        need = int(lengths[i])
        if need > capacity:
            raise ValueError(f"sample {i} has {need} tokens, more than seq_length {capacity}")
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def pack(lengths: np.ndarray, capacity: int, algorithm: str = "bfd") -> list[list[int]]:
    if algorithm == "bfd":
        return pack_bfd(lengths, capacity)
    if algorithm == "greedy":
        return pack_first_fit(lengths, capacity)
    if algorithm == "none":
        if len(lengths) and int(np.max(lengths)) > capacity:
            raise ValueError(f"a sample has {int(np.max(lengths))} tokens, more than seq_length {capacity}")
        return [[i] for i in range(len(lengths))]
    raise ValueError(f"unknown packing algorithm '{algorithm}' (expected one of {', '.join(ALGORITHMS)})")


@dataclass(frozen=True)
class PackingStats:
    samples: int
    rows: int
    seq_length: int
    real_tokens: int
    truncated: int  # samples cut to seq_length
    dropped: int  # samples with no target token left after truncation

    @property
    def padding_fraction(self) -> float:
        """Share of row tokens that are padding."""
        return 1.0 - self.efficiency

    @property
    def efficiency(self) -> float:
        """Share of row tokens that are real (non-pad) tokens."""
        return self.real_tokens / (self.rows * self.seq_length) if self.rows else 0.0

    @property
    def samples_per_row(self) -> float:
        """Rows saved against one-sample-per-row padding (the padded baseline needs `samples` rows)."""
        return self.samples / self.rows if self.rows else 0.0


def build_row(samples: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row from (tokens, target mask) samples; see the module docstring for the per-key rules."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    bounds = [0]
    at = 0
    for ids, mask in samples:
        n = len(ids)
        tokens[at:at + n] = ids
        labels[at:at + n - 1] = ids[1:]  # the last token's label stays pad: nothing after it in this document
        loss_mask[at:at + n - 1] = mask[1:]  # label j is token j + 1: its target flag
        position_ids[at:at + n] = np.arange(n)
        at += n
        bounds.append(at)
    if at < seq_length:  # padding is its own segment, so attention kernels never mix it into a document
        position_ids[at:] = np.arange(seq_length - at)
        bounds.append(seq_length)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "cu_seqlens": np.asarray(bounds, dtype=np.int32)}


class PackedRows:
    """Rows of packed samples; row i (any i >= 0, past the end = next epochs) in a seeded order per epoch."""

    def __init__(self, samples: SFTSamples, seq_length: int, seed: int, pad_id: int, algorithm: str = "bfd") -> None:
        if samples.seq_length > seq_length:
            raise ValueError(f"samples cut to {samples.seq_length} tokens do not fit rows of {seq_length}")
        self.samples = samples
        self.seq_length = seq_length
        self.seed = seed
        self.pad_id = pad_id
        self.packed = algorithm != "none"
        self.rows = pack(samples.lengths, seq_length, algorithm)
        self.stats = PackingStats(samples=len(samples), rows=len(self.rows), seq_length=seq_length,
                                  real_tokens=int(samples.lengths.sum()), truncated=samples.truncated,
                                  dropped=samples.dropped)
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, i: int) -> list[int]:
        """The samples of row i."""
        if i < 0:
            raise IndexError(f"row index must be >= 0, got {i}")
        epoch, position = divmod(int(i), len(self.rows))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self.rows[int(self._perm[position])]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return build_row([self.samples.sample(k) for k in self._row(i)], self.seq_length, self.pad_id)

    def contents(self, i: int) -> tuple[int, int]:
        """(samples, real tokens) of row i, without building it."""
        row = self._row(i)
        return len(row), int(self.samples.lengths[row].sum())


def check_batch_shapes(dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int) -> None:
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size} x "
                         f"micro_batch_size {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")


def collate(rows: list[dict[str, np.ndarray]], packed: bool) -> dict[str, torch.Tensor | int]:
    """Stack rows into a micro batch; packed batches get cu_seqlens over the flattened mbs*S tokens."""
    batch: dict[str, torch.Tensor | int] = {
        key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in ("tokens", "labels", "loss_mask",
                                                                              "position_ids")}
    if packed:
        seq = len(rows[0]["tokens"])
        cu = np.concatenate([[0]] + [r["cu_seqlens"][1:] + k * seq for k, r in enumerate(rows)]).astype(np.int32)
        batch["cu_seqlens"] = torch.from_numpy(cu)
        batch["max_seqlen"] = int(np.diff(cu).max())
    return batch


def packed_microbatches(dataset: PackedRows, *, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                        global_batch_size: int) -> list[dict[str, torch.Tensor | int]]:
    """This DP rank's micro batches of step `step`: rows [step*G, (step+1)*G), rank r's contiguous slice.

    Each micro batch: tokens/labels/position_ids int64 [mbs, S], loss_mask float32 [mbs, S]; when
    packed also cu_seqlens int32 [num_segments + 1] over the flattened mbs*S tokens (row r's
    boundaries offset by r*S) and max_seqlen (python int, longest segment incl. padding).
    """
    check_batch_shapes(dp_rank, dp_size, micro_batch_size, global_batch_size)
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    return [collate([dataset[i] for i in range(start, start + micro_batch_size)], dataset.packed)
            for start in range(first, first + per_rank, micro_batch_size)]
