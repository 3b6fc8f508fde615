"""Under torchrun (or plain python): load ShardForge checkpoints into tensor-parallel models via
dist_checkpointing (which reshards) and save, per tensor-parallel size and checkpoint, the full
(vocab-gathered) logits of given tokens and greedy generations with and without the KV cache.

    hf_logits OUT.pt CASES.json LAYOUT[,LAYOUT...]
LAYOUT: a TP size, or TP:EP (expert parallel, MoE checkpoints).
CASES.json: [{"name", "checkpoint", "tokens": [[...]], "prompt": [...], "max_new_tokens", optional "labels": [[...]]}]
OUT.pt (rank 0): {(tp, name) or ("TP:EP", name): {"logits": [b, s, vocab], "cached": [...], "recomputed": [...]}}
With "labels", also the training loss (mean over tokens) through each loss class the kernel provider
serves (unfused: "loss"; the fused output layer + cross entropy, tp=1 only: "fused_loss"), and the
largest |gradient| of a padded vocabulary row of the output layer and embedding over every TP rank
("padded_grad", "fused_padded_grad").
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
from models.fused_loss import LinearCrossEntropyGPTModel
from models.padded_vocab import PaddedVocabGPTModel
from parallel.megatron_engine import init_distributed, shutdown


def training_loss(model, tokens: torch.Tensor, labels: torch.Tensor, vocab_size: int, fused: bool) -> tuple[float, float]:
    """(mean per-token loss, largest |grad| of a padded vocabulary row over all TP ranks) of one
    forward/backward in training mode through the loss slot's unfused or fused class."""
    model.__class__ = LinearCrossEntropyGPTModel if fused else PaddedVocabGPTModel
    model.train()
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    losses = model(tokens, positions, None, labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.float32))
    losses.mean().backward()
    padded = torch.zeros(())
    for weight in (model.output_layer.weight, model.embedding.word_embeddings.weight):
        local = weight.size(0)
        first = max(vocab_size - ps.get_tensor_model_parallel_rank() * local, 0)  # this slice's first padded row
        assert weight.grad[:first].abs().max() > 0  # the real rows do learn
        if first < local:
            padded = torch.maximum(padded, weight.grad[first:].abs().max())
    torch.distributed.all_reduce(padded, op=torch.distributed.ReduceOp.MAX)
    model.eval()
    return losses.mean().item(), padded.item()


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
                if "labels" in case:
                    tokens, labels = torch.tensor(case["tokens"]), torch.tensor(case["labels"])
                    result = results[(tp if ep == 1 else spec, case["name"])]
                    for fused in (False, True) if tp == 1 else (False,):
                        loss, padded = training_loss(model, tokens, labels, args.vocab_size, fused)
                        result["fused_loss" if fused else "loss"] = loss
                        result["fused_padded_grad" if fused else "padded_grad"] = padded
    finally:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
            torch.save(results, out)
        shutdown()


if __name__ == "__main__":
    main()
