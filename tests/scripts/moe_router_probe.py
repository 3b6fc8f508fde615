"""Under torchrun: train mixtral_tiny (sigmoid router, aux-loss-free expert bias) with the router's
expert bias preset, on fixed random tokens, and print each step's metrics from rank 0.

    moe_router_probe EP STEPS UPDATE_RATE BIAS...   BIAS: one preset expert bias per expert

A large bias on the first experts routes every token to EP rank 0's experts (the other EP
ranks receive zero tokens); a graded bias skews the load for the update rule to correct.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter
from omegaconf import OmegaConf

from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, MICRO, GLOBAL = 64, 2, 8


def main() -> None:
    ep, steps, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    bias = torch.tensor([float(x) for x in sys.argv[4:]])
    args = dataclasses.replace(ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/mixtral_tiny.yaml")),
                               moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                               moe_router_bias_update_rate=rate, moe_aux_loss_coeff=0.0)
    assert len(bias) == args.num_experts
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout(world_size=world, ep=ep, dp=world)
    init_distributed(layout, torch.device("cpu"), seed=3)
    engine = MegatronEngine(args, layout, OptimConfig(), steps=steps,
                            seq_length=SEQ, micro_batch_size=MICRO, seed=3, device=torch.device("cpu"),
                            params_dtype=torch.float32, recompute=None, backend="torch")
    for chunk in engine.chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                module.expert_bias.copy_(bias)
    generator = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
    for step in range(steps):
        batches = []
        for _ in range(GLOBAL // (MICRO * layout.dp)):
            tokens = torch.randint(0, args.vocab_size, (MICRO, SEQ + 1), generator=generator)
            batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                            "loss_mask": torch.ones(MICRO, SEQ), "position_ids": torch.arange(SEQ).expand(MICRO, -1)})
        result = engine.train_step(batches)
        if dist.get_rank() == 0:
            print("METRICS " + json.dumps({"step": step + 1, "loss": result.loss, **result.moe}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
