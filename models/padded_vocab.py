"""The loss slot's base class: megatron-core's GPTModel whose loss leaves the padded vocabulary out.

The embedding and output layer hold `padded_vocab_size` rows (models.args) so every TP size builds
the same model; the rows past `vocab_size` are no tokens. Their logits are set to -inf before the
cross entropy (each TP rank masks the padded part of its vocabulary slice), so the softmax runs
over the real vocabulary only: the loss is the unpadded model's (transformers' for an imported
one) and the padded output rows get exactly zero gradient.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel


def mask_padded_logits_(logits: torch.Tensor, vocab_size: int, partition_start: int) -> torch.Tensor:
    """Set to -inf, in place, the columns of a vocabulary slice [..., V_local] (whose first column
    is global id `partition_start`) that are ids >= vocab_size. In place: the output layer's GEMM
    keeps its inputs, not its output, so autograd allows it, and no second logits tensor is built;
    the fill's backward gives those columns zero gradient."""
    first_padded = max(vocab_size - partition_start, 0)
    if first_padded < logits.size(-1):
        logits.narrow(-1, first_padded, logits.size(-1) - first_padded).fill_(float("-inf"))
    return logits


class PaddedVocabGPTModel(GPTModel):
    """GPTModel built with the padded vocabulary, told the real one (`unpadded_vocab_size`)."""

    def __init__(self, *args, unpadded_vocab_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unpadded_vocab_size = unpadded_vocab_size or self.vocab_size

    def vocab_partition_start(self, local_vocab: int) -> int:
        """Global id of the first column of this TP rank's vocabulary slice."""
        return self.pg_collection.tp.rank() * local_vocab if self.pg_collection.tp is not None else 0

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # logits [s, b, padded vocab / tp]
        if self.unpadded_vocab_size < self.vocab_size:
            mask_padded_logits_(logits, self.unpadded_vocab_size, self.vocab_partition_start(logits.size(-1)))
        return super().compute_language_model_loss(labels, logits)
