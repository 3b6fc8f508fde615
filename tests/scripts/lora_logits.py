"""`python -m tests.scripts.lora_logits OUT.pt LORA_CHECKPOINT [MERGED_CHECKPOINT]` (one process): the
logits of fixed tokens through the LoRA model as training holds it (its engine, loading the
checkpoint's base and then its adapters: unmerged) and, given one, through a plain model loaded
from `launcher.convert merge_lora`'s checkpoint. OUT.pt: {"tokens", "unmerged", "merged"?}, the
logits over the real vocabulary, fp32.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from launcher.generate import forward_logits
from launcher.model_io import build_model, init_world_of_one, load_model_weights, resolve_checkpoint
from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.lora_checkpoint import options, read_reference
from parallel.megatron_engine import MegatronEngine, shutdown


def main(out: str, lora_checkpoint: str, merged_checkpoint: str | None) -> None:
    directory = resolve_checkpoint(lora_checkpoint)
    reference = read_reference(directory)
    args = ModelArgs.from_config(reference["base_model"])
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    result = {"tokens": tokens}
    init_world_of_one(reference["seed"])
    try:
        engine = MegatronEngine(args, Layout(world_size=1), OptimConfig(), steps=1, seq_length=24, micro_batch_size=2,
                                seed=reference["seed"], device=torch.device("cpu"), params_dtype=torch.float32,
                                recompute=None, backend="torch", lora=options(reference))
        engine.load(directory)
        model = engine.chunks[0].module.eval()
        result["unmerged"] = forward_logits(model, tokens)[..., :args.vocab_size].float()
        if merged_checkpoint is not None:
            merged = build_model(args).eval()
            load_model_weights(merged, resolve_checkpoint(merged_checkpoint), args)
            result["merged"] = forward_logits(merged, tokens)[..., :args.vocab_size].float()
    finally:
        shutdown()
    torch.save(result, Path(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
