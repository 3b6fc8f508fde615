"""The training loop: batches in, optimizer steps out, metrics and checkpoints on the way."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from omegaconf import DictConfig, OmegaConf

from launcher import checkpoint
from launcher.flops import peak_flops, train_flops_per_token
from launcher.metrics import MetricsLogger, StepTimer
from models.args import ModelArgs
from parallel.megatron_engine import MegatronEngine


@dataclass
class TrainData:
    """`batches(step=, dp_rank=, dp_size=, micro_batch_size=, global_batch_size=)` -> this rank's
    micro batches of that step; `stats` are constant per-run data metrics (padding fraction ...)."""
    batches: Callable[..., list[dict[str, Any]]]
    stats: dict[str, float] = field(default_factory=dict)


def train(cfg: DictConfig, engine: MegatronEngine, data: TrainData, args: ModelArgs, start_step: int) -> None:
    t = cfg.train
    device = engine.device
    rank0 = dist.get_rank() == 0
    tokens_per_step = t.global_batch_size * t.seq_length
    flops_per_token = train_flops_per_token(seq_length=t.seq_length, **args.flops_shape())
    peak = peak_flops(device)
    logger = None
    if rank0:
        logger = MetricsLogger(cfg.run.dir, total_steps=t.steps, start_step=start_step,
                               progress=cfg.logging.progress, wandb_mode=cfg.logging.wandb.mode,
                               wandb_project=cfg.logging.wandb.project, wandb_name=cfg.logging.wandb.name,
                               tensorboard=cfg.logging.tensorboard,
                               config=OmegaConf.to_container(cfg, resolve=True))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(sync)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    for step in range(start_step, t.steps):
        batches = data.batches(step=step, dp_rank=dp_rank, dp_size=dp_size,
                               micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size)
        result = engine.train_step(batches)
        elapsed = timer.lap()
        done = step + 1
        if rank0 and (done % t.log_every == 0 or done == t.steps):
            record: dict[str, Any] = {
                "step": done, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                "tokens": done * tokens_per_step, "tokens_per_s": tokens_per_step / elapsed,
                "step_time_s": elapsed,
                # tokens that carry a loss (excludes padding, document ends, SFT prompts)
                "loss_tokens": result.num_tokens, "loss_tokens_per_s": result.num_tokens / elapsed,
                **data.stats,
            }
            if peak is not None:
                record["mfu"] = flops_per_token * tokens_per_step / elapsed / (peak * dist.get_world_size())
            if device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log(record)
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0 and done != t.steps:
            checkpoint.save(engine, cfg.checkpoint.dir, done)
            timer.lap()  # keep save time out of the next step's throughput
    if cfg.checkpoint.final_save and t.steps > start_step:
        path = checkpoint.save(engine, cfg.checkpoint.dir, t.steps)
        if rank0:
            print(f"saved checkpoint {path}", flush=True)
    if logger is not None:
        logger.close()
