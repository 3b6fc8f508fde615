"""DPO's reference pass (MegatronEngine.sequence_logps: forward only, no grad, the preference loss
slot) holds no GPU memory from one call to the next: it runs once per micro batch of the whole
dataset before training, so anything kept per call adds up to the card's size."""
from __future__ import annotations

import pytest
import torch

from parallel.preference_loss import ObjectiveConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _microbatch(rows: int, seq: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab, (rows, seq), generator=generator)
    loss_mask = torch.ones(rows, seq)
    loss_mask[:, : seq // 4] = 0  # the prompt
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": loss_mask,
            "position_ids": torch.arange(seq).expand(rows, seq).contiguous(),
            "sequence_mask": torch.ones(rows, seq), "pair_index": torch.arange(rows // 2)}


def test_reference_pass_does_not_grow_memory(build_engine):
    args, engine = build_engine("tiny", seed=3, seq_length=256, micro_batch_size=4, params_dtype=torch.bfloat16,
                                objective=ObjectiveConfig(name="dpo"))
    g = torch.Generator().manual_seed(0)
    first = engine.sequence_logps([_microbatch(4, 256, args.vocab_size, g)])
    assert first is not None and first.shape == (4,) and torch.isfinite(first).all()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    after = []  # MiB more than before, after each call: steady growth per call is a leak, one step is a cache
    for _ in range(20):
        engine.sequence_logps([_microbatch(4, 256, args.vocab_size, g)])
        torch.cuda.synchronize()
        after.append((torch.cuda.memory_allocated() - before) / 2**20)
    assert after[-1] < 1, f"20 reference micro batches left {after[-1]:.1f} MiB more allocated; after each call: " \
                          + ", ".join(f"{m:.2f}" for m in after)
