"""The per-token and clipping scales of the gradients, applied inside the fused AdamW step.

With a token-weighted loss (calculate_per_token_loss) megatron-core's finalize_model_grads
multiplies every fp32 main grad by 1 / (loss tokens in the global batch), and when the grad norm
is above `optim.clip_grad` the optimizer multiplies them again by the clip coefficient: two
passes over all gradients.
torch's fused AdamW divides the gradients by a scalar tensor inside its own pass (`grad_scale`,
what GradScaler uses), so here the grads stay sums over tokens, their norm is divided by the
token count, and AdamW gets grad_scale = tokens / clip coefficient: the same update, no passes.
The norm, the clip coefficient and the scale stay on the device: the host queues AdamW behind
the backward instead of waiting for the norm (megatron's get_grad_norm returns a Python float).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads

from parallel.grad_norm import l2_norm


class FoldedGradScaling:
    """`finalize_model_grads` (the schedule's hook: reductions, no scaling) and `step` (the
    optimizer step in place of megatron's `optimizer.step()`), for an optimizer whose every
    part is torch's fused AdamW (see `applies`)."""

    def __init__(self, optimizer: Any, clip_grad: float, device: torch.device):
        self.optimizer, self.clip_grad, self.device = optimizer, clip_grad, device
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

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of all main grads as a device tensor: megatron's get_grad_norm (squares summed
        over each optimizer's grad-stats group, then over the chained optimizers) without its .item()."""
        total = None
        for chained in self.optimizer.chained_optimizers:
            grads = chained.get_main_grads_for_grad_norm()
            # bf16 grads: in fp32 (in the multi-tensor fallback, asking fp64 of bf16
            # falls back to a conversion and a reduction per tensor);
            # fp32 grads: in fp64, as megatron's reference agrees to 1e-6. Squares summed in fp64.
            dtype = torch.float32 if grads and grads[0].dtype == torch.bfloat16 else torch.float64
            squares = (l2_norm(grads, dtype).double().square()
                       if grads else torch.zeros((), dtype=torch.float64, device=self.device))
            dist.all_reduce(squares, group=chained.get_grad_stats_parallel_group())
            total = squares if total is None else total + squares
        return total.sqrt()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One optimizer step; returns the grad norm (of the per-token-scaled grads, before clipping)
        as a 0-dim device tensor."""
        if self.optimizer.prepare_grads():  # found inf/nan (fp16 loss scaling only): skip, as megatron does
            return torch.tensor(float("nan"))
        grad_norm = self.grad_norm()
        tokens = torch.ones((), dtype=torch.float64, device=grad_norm.device)
        if self.loss_tokens is not None:
            counted = self.loss_tokens.to(tokens)
            tokens = torch.where(counted > 0, counted, tokens)
        grad_norm = grad_norm / tokens
        divisor = tokens
        if self.clip_grad > 0.0:
            coeff = self.clip_grad / (grad_norm + 1.0e-6)  # megatron's clip_grad_by_total_norm_fp32
            divisor = tokens / coeff.clamp(max=1.0)
        for adamw in self.adamws:
            for group in adamw.param_groups:  # a loaded checkpoint brings its own flags; only fused takes grad_scale
                group["fused"], group["foreach"] = True, False
            scale = getattr(adamw, "grad_scale", None)
            if scale is None:
                device = adamw.param_groups[0]["params"][0].device
                scale = adamw.grad_scale = torch.empty((), dtype=torch.float32, device=device)
            scale.copy_(divisor)
        self.optimizer.step_with_ready_grads()
        return grad_norm
