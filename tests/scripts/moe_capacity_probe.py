"""Train mixtral_tiny with a capacity factor (one process, fixed random tokens) and print, per step,
the dropped fraction ShardForge reports next to one counted here from the routers' inputs alone.

    moe_capacity_probe STEPS CAPACITY_FACTOR

The count does not use megatron's routing or dropping code: for every router call (one micro
batch, one layer) it takes the top-k experts of the router logits (Mixtral: top-k of the logits,
softmax over those k), counts tokens per expert and keeps min(count, capacity) of them, with
capacity = ceil(tokens * top-k / experts * factor) (megatron's documented rule).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter
from omegaconf import OmegaConf

from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, MICRO, GLOBAL = 64, 2, 8


def main() -> None:
    steps, factor = int(sys.argv[1]), float(sys.argv[2])
    args = dataclasses.replace(ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/mixtral_tiny.yaml")),
                               moe_expert_capacity_factor=factor)
    layout = Layout(world_size=1)
    init_distributed(layout, torch.device("cpu"), seed=5)
    engine = MegatronEngine(args, layout, OptimConfig(), steps=steps,
                            seq_length=SEQ, micro_batch_size=MICRO, seed=5, device=torch.device("cpu"),
                            params_dtype=torch.float32, recompute=None, backend="torch")
    counted = {"kept": 0, "asked": 0}

    def count(router: TopKRouter, inputs) -> None:
        x = inputs[0].reshape(-1, args.hidden_size).float()
        top = torch.topk(F.linear(x, router.weight.float()), args.moe_router_topk, dim=-1).indices
        per_expert = torch.bincount(top.flatten(), minlength=args.num_experts)
        capacity = math.ceil(x.size(0) * args.moe_router_topk / args.num_experts * factor)
        counted["kept"] += int(per_expert.clamp(max=capacity).sum())
        counted["asked"] += top.numel()

    for chunk in engine.chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_pre_hook(count)
    generator = torch.Generator().manual_seed(7)
    for step in range(steps):
        batches = []
        for _ in range(GLOBAL // MICRO):
            tokens = torch.randint(0, args.vocab_size, (MICRO, SEQ + 1), generator=generator)
            batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                            "loss_mask": torch.ones(MICRO, SEQ), "position_ids": torch.arange(SEQ).expand(MICRO, -1)})
        counted.update(kept=0, asked=0)
        result = engine.train_step(batches)
        independent = 1 - counted["kept"] / counted["asked"]
        print("METRICS " + json.dumps({"step": step + 1, "loss": result.loss, **result.moe,
                                       "independent_dropped_fraction": independent}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
