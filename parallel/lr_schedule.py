"""The learning-rate / weight-decay schedule both engines step: megatron-core's scheduler,
linear warmup then `optim.decay_style` decay to `optim.min_lr` over the run.

On resume the step count always comes from the checkpoint; the schedule's shape (peak and final
lr, warmup, decay length and style, weight decay) comes from this run's config by default
(megatron-core's `override_opt_param_scheduler`), or from the checkpoint with
`checkpoint.keep_saved_schedule=true` (`use_checkpoint_opt_param_scheduler`).
"""
from __future__ import annotations

from typing import Any

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from parallel.engine_config import OptimConfig

# The scheduler's state that a config sets, by the config key that sets it.
_CONFIG_KEYS = {"max_lr": "optim.lr", "min_lr": "optim.min_lr", "lr_warmup_steps": "optim.warmup_steps",
                "lr_decay_steps": "train.steps", "lr_decay_style": "optim.decay_style",
                "start_wd": "optim.weight_decay"}


def lr_scheduler(optimizer: Any, optim: OptimConfig, steps: int, keep_saved: bool = False) -> OptimizerParamScheduler:
    """The schedule of a `steps`-step run; `keep_saved`: a loaded checkpoint's schedule wins over it."""
    warmup = min(optim.warmup_steps, steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=steps,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=keep_saved,
        override_opt_param_scheduler=not keep_saved)


def load_schedule(scheduler: OptimizerParamScheduler, saved: dict[str, Any]) -> str | None:
    """Load a checkpoint's scheduler state (its step count, and its schedule when the scheduler keeps
    saved ones); returns one line saying how this config's schedule differs from the saved one, and
    which of them the run follows, or None when they agree."""
    configured = scheduler.state_dict()
    scheduler.load_state_dict(saved)
    changed = [f"{key} {saved.get(name)} -> {configured[name]}" for name, key in _CONFIG_KEYS.items()
               if saved.get(name) != configured[name]]
    if not changed:
        return None
    if scheduler.override_opt_param_scheduler:
        return (f"lr schedule: following this config's from step {scheduler.num_steps} ({', '.join(changed)}); "
                f"checkpoint.keep_saved_schedule=true keeps the checkpoint's")
    return (f"lr schedule: keeping the checkpoint's (checkpoint.keep_saved_schedule=true); this config's "
            f"{', '.join(changed)} not applied")
