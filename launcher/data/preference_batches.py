"""Preference pairs as training micro batches: whole pairs, one sequence per row.

The pairs of a preference dataset, or of several together (launcher/data/preference.py), are read
in a seeded order, reshuffled each epoch. Step s's global batch is pairs [s·P, (s+1)·P) of that order, with
P = global_batch_size / 2 (train.global_batch_size counts rows, two per pair); DP rank r takes
its contiguous share and cuts it into micro batches of micro_batch_size / 2 pairs. Row 2i of a
micro batch is its pair i's chosen side, row 2i + 1 the rejected side, so every loss term of a
pair is computed inside one micro batch.

Besides the LM micro-batch keys (tokens, labels, loss_mask, position_ids: launcher/data/packing.py's
`collate`, unpacked), each micro batch carries what the preference loss needs to normalise over
the global batch without another collective: `pair_index` (the pairs' dataset indices), `pairs_global`
(P) and `chosen_tokens_global` (target tokens of every chosen side in the global batch;
`chosen_sequence_tokens_global` counts every token of them that has a label in its sequence, which
`sequence_mask` marks per token), and, once a
reference is attached, `reference_logps` (the frozen reference's summed log-probs per sequence).

Packed (`PackedPreferenceBatches`, data.packing=true): pairs are packed into rows of seq_length
tokens by launcher/data/packing.py's algorithms (a pair, its chosen side then its rejected side,
is one item), once over the dataset; rows are read in a seeded order per epoch, as packed SFT rows
are. Step s's global batch is rows [s·G, (s+1)·G) with G = global_batch_size rows, DP rank r takes
its contiguous share, micro batches hold micro_batch_size rows; P is the number of pairs in the
global batch's rows. A packed micro batch has the packed collate's cu_seqlens and, per token,
`sequence_ids`: 2i and 2i + 1 for the chosen and rejected side of the micro batch's pair i, -1 for
padding.
"""
from __future__ import annotations

import numpy as np
import torch

from launcher.data.packing import build_row, check_batch_shapes, collate, pack
from launcher.data.preference import ConcatenatedPairs, PreferencePairs


def sequence_mask(bounds: np.ndarray, sequences: int, seq_length: int) -> np.ndarray:
    """1.0 at every token of a row's first `sequences` sequences (which end at `bounds[1:]`) whose label
    is in its own sequence: all but each sequence's last token."""
    mask = np.zeros(seq_length, dtype=np.float32)
    for j in range(sequences):
        mask[bounds[j]:bounds[j + 1] - 1] = 1
    return mask


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded read order of `n` items (pairs, or packed rows) in epoch `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_pair_batch_shapes(dp_size: int, micro_batch_size: int, global_batch_size: int) -> None:
    """Rows come in pairs: both batch sizes even, the global batch a whole number of micro batches per DP rank."""
    if micro_batch_size % 2 or global_batch_size % 2:
        raise ValueError(f"micro_batch_size {micro_batch_size} and global_batch_size {global_batch_size} must be "
                         f"even (a chosen and a rejected row per pair)")
    check_batch_shapes(0, dp_size, micro_batch_size, global_batch_size)


class PreferenceBatches:
    """Micro batches of whole pairs (layout in the module docstring); a pure function of (seed, step)."""

    def __init__(self, pairs: PreferencePairs | ConcatenatedPairs, seq_length: int, seed: int, pad_id: int) -> None:
        self.pairs, self.seq_length, self.seed, self.pad_id = pairs, seq_length, seed, pad_id
        self.reference: np.ndarray | None = None  # [pairs, 2] float64: chosen, rejected (attach_reference)
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        # target tokens of each pair's chosen side (a target is predicted from the token before it)
        self.chosen_targets = pairs.chosen_targets()
        self.chosen_sequence_tokens = pairs.lengths[:, 0] - 1  # a sequence's last token has no label in it

    def __len__(self) -> int:
        return len(self.pairs)

    def attach_reference(self, reference: np.ndarray) -> None:
        """The reference's summed log-probs per pair ([pairs, 2]), read into every later micro batch."""
        if reference.shape != (len(self.pairs), 2):
            raise ValueError(f"reference log-probs of shape {reference.shape} for {len(self.pairs)} pairs")
        self.reference = reference

    def pair_at(self, i: int) -> int:
        """The dataset pair index of position `i` of the read order."""
        epoch, position = divmod(int(i), len(self.pairs))
        if epoch != self._perm_epoch:
            self._perm = epoch_order(self.seed, epoch, len(self.pairs))
            self._perm_epoch = epoch
        return int(self._perm[position])

    def collate_pairs(self, pair_indices: list[int]) -> dict[str, torch.Tensor | int]:
        """One micro batch of the given pairs (rows 2i, 2i + 1: pair i's chosen and rejected sides)."""
        rows = []
        for k in pair_indices:
            pair = self.pairs.pair(k)
            rows.append(build_row([(pair.chosen_ids, pair.chosen_mask)], self.seq_length, self.pad_id))
            rows.append(build_row([(pair.rejected_ids, pair.rejected_mask)], self.seq_length, self.pad_id))
        batch = collate(rows, packed=False)
        batch["sequence_mask"] = torch.from_numpy(np.stack([sequence_mask(r["cu_seqlens"], 1, self.seq_length)
                                                            for r in rows]))
        batch["pair_index"] = torch.tensor(pair_indices, dtype=torch.int64)
        if self.reference is not None:
            batch["reference_logps"] = torch.from_numpy(self.reference[pair_indices].reshape(-1).copy())
        return batch

    def reference_count(self, micro_batch_size: int) -> int:
        """How many micro batches the reference pass (launcher/preference_reference.py) reads."""
        per_mb = micro_batch_size // 2
        return -(-len(self.pairs) // per_mb)

    def reference_microbatch(self, i: int, micro_batch_size: int) -> tuple[dict[str, torch.Tensor | int], int]:
        """Micro batch `i` of the reference pass, which reads every pair once in dataset order, and how many
        of its leading pairs are new: every micro batch is full (pipeline stages exchange one shape), the
        last one filled up with pairs from the start."""
        n, per_mb = len(self.pairs), micro_batch_size // 2
        start = i * per_mb
        return self.collate_pairs([k % n for k in range(start, start + per_mb)]), min(per_mb, n - start)

    def microbatches(self, *, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                     global_batch_size: int) -> list[dict[str, torch.Tensor | int]]:
        """This DP rank's micro batches of step `step` (TrainData.batches' contract)."""
        check_pair_batch_shapes(dp_size, micro_batch_size, global_batch_size)
        pairs_global, per_mb = global_batch_size // 2, micro_batch_size // 2
        order = [self.pair_at(step * pairs_global + j) for j in range(pairs_global)]
        step_counts = {"pairs_global": pairs_global, "chosen_tokens_global": int(self.chosen_targets[order].sum()),
                       "chosen_sequence_tokens_global": int(self.chosen_sequence_tokens[order].sum())}
        per_rank = pairs_global // dp_size
        mine = order[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return [{**self.collate_pairs(mine[start:start + per_mb]), **step_counts}
                for start in range(0, per_rank, per_mb)]

    def step_stats(self, *, step: int, global_batch_size: int) -> dict[str, float]:
        """Padding of step `step`'s global batch: the share of its row tokens that are padding."""
        pairs_global = global_batch_size // 2
        order = [self.pair_at(step * pairs_global + j) for j in range(pairs_global)]
        real = int(self.pairs.lengths[order].sum())
        return {"padding_fraction": 1 - real / (global_batch_size * self.seq_length)}


class PackedPreferenceBatches(PreferenceBatches):
    """Micro batches of rows of packed pairs (layout in the module docstring); a pure function of (seed, step)."""

    def __init__(self, pairs: PreferencePairs | ConcatenatedPairs, seq_length: int, seed: int, pad_id: int,
                 algorithm: str = "bfd") -> None:
        super().__init__(pairs, seq_length, seed, pad_id)
        self.rows = pack(pairs.lengths.sum(axis=1), seq_length, algorithm)  # rows as lists of pair indices
        self._row_epoch = -1
        self._row_perm = np.empty(0, dtype=np.int64)

    def row_at(self, i: int) -> list[int]:
        """The pairs of position `i` of the rows' read order."""
        epoch, position = divmod(int(i), len(self.rows))
        if epoch != self._row_epoch:
            self._row_perm = epoch_order(self.seed, epoch, len(self.rows))
            self._row_epoch = epoch
        return self.rows[int(self._row_perm[position])]

    def reference_count(self, micro_batch_size: int) -> int:
        return -(-len(self.rows) // micro_batch_size)

    def reference_microbatch(self, i: int, micro_batch_size: int) -> tuple[dict[str, torch.Tensor | int], int]:
        """The reference pass reads the packed rows in their packing order, micro_batch_size a micro batch
        (the last one filled up with rows from the start)."""
        n, start = len(self.rows), i * micro_batch_size
        rows = [self.rows[j % n] for j in range(start, start + micro_batch_size)]
        return self.collate_rows(rows), sum(len(row) for row in rows[:max(0, n - start)])

    def collate_rows(self, rows: list[list[int]]) -> dict[str, torch.Tensor | int]:
        """One packed micro batch of these rows (each a list of pair indices)."""
        built, ids, masks = [], [], []
        order = [k for row in rows for k in row]
        first = 0  # the micro batch's sequence id of the row's first sequence
        for row in rows:
            samples = []
            for k in row:
                pair = self.pairs.pair(k)
                samples += [(pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask)]
            r = build_row(samples, self.seq_length, self.pad_id)
            sequence = np.full(self.seq_length, -1, dtype=np.int64)
            bounds = r["cu_seqlens"]
            for j in range(len(samples)):
                sequence[bounds[j]:bounds[j + 1]] = first + j
            first += len(samples)
            built.append(r)
            ids.append(sequence)
            masks.append(sequence_mask(bounds, len(samples), self.seq_length))
        batch = collate(built, packed=True)
        batch["sequence_ids"] = torch.from_numpy(np.stack(ids))
        batch["sequence_mask"] = torch.from_numpy(np.stack(masks))
        batch["pair_index"] = torch.tensor(order, dtype=torch.int64)
        if self.reference is not None:
            batch["reference_logps"] = torch.from_numpy(self.reference[order].reshape(-1).copy())
        return batch

    def microbatches(self, *, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                     global_batch_size: int) -> list[dict[str, torch.Tensor | int]]:
        """This DP rank's micro batches of step `step` (TrainData.batches' contract)."""
        check_batch_shapes(dp_rank, dp_size, micro_batch_size, global_batch_size)
        rows = [self.row_at(step * global_batch_size + j) for j in range(global_batch_size)]
        step_pairs = np.concatenate(rows)
        step_counts = {"pairs_global": len(step_pairs),
                       "chosen_tokens_global": int(self.chosen_targets[step_pairs].sum()),
                       "chosen_sequence_tokens_global": int(self.chosen_sequence_tokens[step_pairs].sum())}
        per_rank = global_batch_size // dp_size
        mine = rows[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return [{**self.collate_rows(mine[start:start + micro_batch_size]), **step_counts}
                for start in range(0, per_rank, micro_batch_size)]

    def step_stats(self, *, step: int, global_batch_size: int) -> dict[str, float]:
        """Padding of step `step`'s global batch: the share of its row tokens that are padding."""
        rows = [self.row_at(step * global_batch_size + j) for j in range(global_batch_size)]
        real = int(sum(self.pairs.lengths[row].sum() for row in rows))
        return {"padding_fraction": 1 - real / (global_batch_size * self.seq_length)}
