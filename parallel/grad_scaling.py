"""The per-token and clipping scales of the gradients, applied inside the fused AdamW step.

With a token-weighted loss (calculate_per_token_loss) megatron-core's finalize_model_grads
multiplies every fp32 main grad by 1 / (loss tokens in the global batch), and when the grad norm
is above `optim.clip_grad` the optimizer multiplies them again by the clip coefficient: two
passes over all gradients (3.8 + 3.4 ms of a 143 ms step for 1.14B parameters on an H100).
torch's fused AdamW divides the gradients by a scalar tensor inside its own pass (`grad_scale`,
what GradScaler uses), so here the grads stay sums over tokens, their norm is divided by the
token count, and AdamW gets grad_scale = tokens / clip coefficient: the same update, no passes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads


class FoldedGradScaling:
    """`finalize_model_grads` (the schedule's hook: reductions, no scaling) and `step` (the
    optimizer step in place of megatron's `optimizer.step()`), for an optimizer whose every
    part is torch's fused AdamW (see `applies`)."""

    def __init__(self, optimizer: Any, clip_grad: float):
        self.optimizer, self.clip_grad = optimizer, clip_grad
        self.adamws = [c.optimizer for c in optimizer.chained_optimizers if c.optimizer.param_groups]
        self.loss_tokens: torch.Tensor | None = None

    @staticmethod
    def applies(optimizer: Any) -> bool:
        return all(isinstance(c.optimizer, torch.optim.AdamW) and c.optimizer.defaults.get("fused")
                   for c in optimizer.chained_optimizers)

    def finalize_model_grads(self, model: list, num_tokens: torch.Tensor | None = None, **kwargs: Any) -> None:
        finalize_model_grads(model, None, **kwargs)  # DP / TP / embedding reductions; grads stay token sums
        if num_tokens is not None:  # megatron's count: from the last pipeline stage, summed over DP x CP
            pp_group = ps.get_pipeline_model_parallel_group()
            dist.broadcast(num_tokens, src=dist.get_process_group_ranks(pp_group)[-1], group=pp_group)
            dist.all_reduce(num_tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
        self.loss_tokens = num_tokens

    @torch.no_grad()
    def step(self) -> float:
        """One optimizer step; returns the grad norm (of the per-token-scaled grads, before clipping)."""
        if self.optimizer.prepare_grads():  # found inf/nan (fp16 loss scaling only): skip, as megatron does
            return float("nan")
        tokens = float(self.loss_tokens) if self.loss_tokens is not None and self.loss_tokens > 0 else 1.0
        grad_norm = float(self.optimizer.get_grad_norm()) / tokens
        divisor = tokens
        if self.clip_grad > 0.0:
            coeff = self.clip_grad / (grad_norm + 1.0e-6)  # megatron's clip_grad_by_total_norm_fp32
            if coeff < 1.0:
                divisor /= coeff
        for adamw in self.adamws:
            for group in adamw.param_groups:  # a loaded checkpoint brings its own flags; only fused takes grad_scale
                group["fused"], group["foreach"] = True, False
            scale = getattr(adamw, "grad_scale", None)
            if scale is None:
                device = adamw.param_groups[0]["params"][0].device
                scale = adamw.grad_scale = torch.empty((), dtype=torch.float32, device=device)
            scale.fill_(divisor)
        self.optimizer.step_with_ready_grads()
        return grad_norm
