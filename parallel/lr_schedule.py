"""The learning-rate / weight-decay schedule both engines step: megatron-core's scheduler,
linear warmup then `optim.decay_style` decay to `optim.min_lr` over the run."""
from __future__ import annotations

from typing import Any

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from parallel.engine_config import OptimConfig


def lr_scheduler(optimizer: Any, optim: OptimConfig, steps: int) -> OptimizerParamScheduler:
    warmup = min(optim.warmup_steps, steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=steps,
        wd_incr_style="constant")
