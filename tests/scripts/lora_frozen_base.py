"""`python -m tests.scripts.lora_frozen_base OUT.json [OVERRIDE ...]` (plain or under torchrun): the
LoRA run the overrides compose, stepped in this process (the training loop's batches, no
checkpoints), with every model tensor gathered whole before its first step and after its last.
OUT.json (rank 0): the keys that changed with their largest change, the keys that did not, and
the parameters that DDP's gradient buffers hold (only what trains gets a gradient and optimizer
state).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from megatron.core import parallel_state as ps

from launcher import checkpoint
from launcher.config.validate import validate, world_size_from_env
from launcher.model_path import resolve_model_argv
from launcher.train import build_data, build_engine
from models.args import ModelArgs
from parallel.megatron_engine import init_distributed, shutdown

CONF = Path(__file__).resolve().parents[2] / "conf"


def main(out: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        # (model=<checkpoint> resolved as launcher.train resolves it)
        composed = compose(config_name="config", overrides=resolve_model_argv(overrides))
    resolved = validate(composed, world_size_from_env(), "cpu", writes_run_dir=False)
    cfg, layout, t = resolved.config, resolved.layout, resolved.config.train
    data = build_data(cfg)
    cpu = torch.device("cpu")
    init_distributed(layout, cpu, t.seed)
    try:
        engine = build_engine(cfg, ModelArgs.from_config(asdict(cfg.model)), layout, cpu)
        if cfg.checkpoint.load:
            checkpoint.load(engine, cfg.checkpoint.load)
        names = {id(p): n for c in engine.chunks for n, p in c.module.named_parameters()}
        in_buffers = sorted(names[id(p)] for c in engine.chunks for b in c.buffers for p in b.param_index_map)
        before = engine.export_weights()
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        for step in range(t.steps):
            engine.train_step(data.batches(step=step, dp_rank=dp_rank, dp_size=dp_size,
                                           micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size))
        after = engine.export_weights()
        rank = dist.get_rank()
    finally:
        shutdown()
    if rank == 0:
        keys = sorted(k for k in before if not k.endswith("_extra_state"))
        changed = {k: (after[k] - before[k]).abs().max().item() for k in keys if not torch.equal(before[k], after[k])}
        Path(out).write_text(json.dumps({"changed": changed, "unchanged": [k for k in keys if k not in changed],
                                         "in_grad_buffers": in_buffers}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
