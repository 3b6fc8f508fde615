"""Under torchrun (or plain python): load ShardForge checkpoints into tensor-parallel models via
dist_checkpointing (which reshards) and save, per tensor-parallel size and checkpoint, the full
(vocab-gathered) logits of given tokens and greedy generations with and without the KV cache.

    hf_logits OUT.pt CASES.json LAYOUT[,LAYOUT...]
LAYOUT: a TP size, or TP:EP (expert parallel, MoE checkpoints).
CASES.json: [{"name", "checkpoint", "tokens": [[...]], "prompt": [...], "max_new_tokens"}]
OUT.pt (rank 0): {(tp, name) or ("TP:EP", name): {"logits": [b, s, vocab], "cached": [...], "recomputed": [...]}}
Each TP size must divide the world size (the rest is data parallel, computing the same).
"""
from __future__ import annotations

import json
import os
import sys

import torch
from megatron.core import parallel_state as ps

from launcher.model_io import build_model, load_model_weights, model_args_for, resolve_checkpoint
from launcher.generate import forward_logits, generate
from parallel.layout import Layout
from parallel.megatron_engine import init_distributed, shutdown


def main() -> None:
    out, cases, layouts = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3].split(",")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}
    try:
        for spec in layouts:
            tp, _, ep = spec.partition(":")
            tp, ep = int(tp), int(ep or 1)
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            init_distributed(Layout(world_size=world, tp=tp, ep=ep, dp=world // tp), torch.device("cpu"), seed=0)
            for case in cases:
                directory = resolve_checkpoint(case["checkpoint"])
                args = model_args_for(directory, None)
                model = build_model(args, tp=tp, ep=ep)
                load_model_weights(model, directory, args)
                model.eval()
                kw = dict(vocab_size=args.vocab_size, max_new_tokens=case["max_new_tokens"])
                results[(tp if ep == 1 else spec, case["name"])] = {
                    "logits": forward_logits(model, torch.tensor(case["tokens"]))[..., : args.vocab_size],
                    "cached": generate(model, case["prompt"], kv_cache=True, **kw),
                    "recomputed": generate(model, case["prompt"], kv_cache=False, **kw),
                }
    finally:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
            torch.save(results, out)
        shutdown()


if __name__ == "__main__":
    main()
