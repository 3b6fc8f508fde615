"""One entry point from the `data.*` keys to a micro-batch stream over preprocessed (indexed) data.

  format=pretrain, packing=false  fixed windows over the blended token streams, Megatron EOD options
  format=pretrain, packing=true   whole documents (cut to seq_length) packed into rows
  format=sft                      conversations (cut to seq_length, assistant-only loss), packed
                                  rows when packing=true, one padded conversation per row otherwise

Every variant's micro batches follow `launcher.data.packing.packed_microbatches`' contract, and
the stream is a pure function of (seed, step) whatever the DP size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from launcher.data.gpt_dataset import BlendedDataset, IndexedWindows, pretrain_microbatches
from launcher.data.indexed import IndexedDataset
from launcher.data.packing import PackedRows, PackingStats, packed_microbatches
from launcher.data.sft import SFTSamples
from launcher.data.split import Bookends, document_range
from launcher.data.tokenizer import Tokenizer, fill_id


class _RowBlend:
    """Packed rows of several datasets interleaved by weight (BlendedDataset's schedule)."""

    def __init__(self, rows: list[PackedRows], weights: Sequence[float], block: int) -> None:
        self._blend = BlendedDataset(rows, weights, block)  # type: ignore[arg-type]
        self.seq_length = rows[0].seq_length
        self.packed = rows[0].packed

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self._blend[i]  # type: ignore[return-value]

    def contents(self, i: int) -> tuple[int, int]:
        source, row = self._blend.source(i)
        return self._blend.datasets[source].contents(row)  # type: ignore[union-attr]


@dataclass
class TrainingData:
    dataset: IndexedWindows | BlendedDataset | PackedRows | _RowBlend
    windows: bool  # pretraining windows (packing=false) rather than rows of whole samples
    stats: list[PackingStats]  # one per source for row datasets; empty for windows
    eod_id: int | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    def microbatches(self, *, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                     global_batch_size: int) -> list[dict[str, torch.Tensor | int]]:
        if self.windows:
            return pretrain_microbatches(self.dataset, step=step, dp_rank=dp_rank, dp_size=dp_size,  # type: ignore
                                         micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                                         eod_id=self.eod_id, reset_position_ids=self.reset_position_ids,
                                         reset_attention_mask=self.reset_attention_mask,
                                         eod_mask_loss=self.eod_mask_loss)
        return packed_microbatches(self.dataset, step=step, dp_rank=dp_rank, dp_size=dp_size,  # type: ignore
                                   micro_batch_size=micro_batch_size, global_batch_size=global_batch_size)

    def step_stats(self, *, step: int, global_batch_size: int) -> dict[str, float]:
        """Padding of step `step`'s global batch (every DP rank's rows, read from the row index
        without building the rows): `padding_fraction` (share of its row tokens that are padding)
        and `samples_per_row`. Empty for pretraining windows, which have no padding."""
        if self.windows:
            return {}
        first = step * global_batch_size
        samples = real = 0
        for i in range(first, first + global_batch_size):
            n, tokens = self.dataset.contents(i)  # type: ignore[union-attr]
            samples, real = samples + n, real + tokens
        return {"padding_fraction": 1 - real / (global_batch_size * self.dataset.seq_length),  # type: ignore
                "samples_per_row": samples / global_batch_size}

    def distinct_samples(self) -> int:
        """How many samples (windows or rows) the stream yields before its first repeat: past it a
        source starts its next epoch."""
        blend = self.dataset._blend if isinstance(self.dataset, _RowBlend) else self.dataset
        if not isinstance(blend, BlendedDataset):
            return len(self.dataset)  # type: ignore[arg-type]
        first_repeat = []
        for d, source in enumerate(blend.datasets):
            per_block = int(blend._counts[d])
            block, local = divmod(len(source), per_block)  # type: ignore[arg-type]
            slot = int(np.flatnonzero((blend._source == d) & (blend._local == local))[0])
            first_repeat.append(block * blend.block + slot)
        return min(first_repeat)


def build_training_data(prefixes: Sequence[str], tokenizer: Tokenizer, *, seq_length: int, seed: int,
                        format: str = "pretrain", weights: Sequence[float] | None = None, packing: bool = False,
                        packing_algorithm: str = "bfd", reset_position_ids: bool = False,
                        reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                        blend_block: int = 1000, source_seeds: Sequence[int] | None = None,
                        documents: Bookends | None = None) -> TrainingData:
    """Open the indexed datasets `prefixes` (blended by `weights`, default equal) as a micro-batch stream.

    Source k's order is seeded by `source_seeds[k]`, by default `hash_seed(seed, k)`. `documents`:
    book-ends of a split part (launcher.data.split): each source keeps only those documents.
    """
    if not prefixes:
        raise ValueError("data.prefixes: no dataset given")
    weights = list(weights) if weights is not None else [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ValueError(f"data.weights: {len(weights)} weights for {len(prefixes)} datasets")
    seeds = list(source_seeds) if source_seeds is not None else [hash_seed(seed, k) for k in range(len(prefixes))]
    if len(seeds) != len(prefixes):
        raise ValueError(f"{len(seeds)} source seeds for {len(prefixes)} datasets")
    if format not in ("pretrain", "sft"):
        raise ValueError(f"data.format: '{format}' is not one of pretrain, sft")
    sources = [IndexedDataset(p) for p in prefixes]
    if documents is not None:
        sources = [s.documents(part.start, part.stop) for s in sources
                   for part in [document_range(documents, len(s))]]
    for src in sources:
        # One sequential pass over each token file: a dataset made with another tokenizer fails here, not mid-run.
        if format == "sft" and not src.has_mask:
            raise ValueError(f"data.format=sft but {src.prefix} has no .mask.bin (preprocess it with format=sft)")
        if len(src.tokens) and int(np.max(src.tokens)) >= tokenizer.vocab_size:
            raise ValueError(f"{src.prefix} holds token id {int(np.max(src.tokens))}, outside tokenizer "
                             f"{tokenizer.path}'s vocabulary of {tokenizer.vocab_size}")
    if format == "pretrain" and not packing:
        windows = [IndexedWindows(s, seq_length, seed=seeds[k]) for k, s in enumerate(sources)]
        dataset = windows[0] if len(windows) == 1 else BlendedDataset(windows, weights, blend_block)
        return TrainingData(dataset, True, [], tokenizer.eos_id, reset_position_ids, reset_attention_mask,
                            eod_mask_loss)
    algorithm = packing_algorithm if packing else "none"
    rows = [PackedRows(SFTSamples(s, seq_length), seq_length, seed=seeds[k], pad_id=fill_id(tokenizer),
                       algorithm=algorithm) for k, s in enumerate(sources)]
    dataset = rows[0] if len(rows) == 1 else _RowBlend(rows, weights, blend_block)
    return TrainingData(dataset, False, [r.stats for r in rows])


def hash_seed(seed: int, source: int) -> int:
    """Each source's own order: independent streams for one run seed (2**32 keeps entropy words apart)."""
    return seed * 2**32 + source
