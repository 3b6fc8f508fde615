"""The learning-rate / weight-decay schedule both engines step: megatron-core's scheduler,
linear warmup then `optim.decay_style` decay to `optim.min_lr` over the run."""
from __future__ import annotations

from typing import Any

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def lr_scheduler(optimizer: Any, optim_cfg: Any, steps: int) -> OptimizerParamScheduler:
    warmup = min(optim_cfg.warmup_steps, steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style=optim_cfg.decay_style,
        start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=steps,
        wd_incr_style="constant")
