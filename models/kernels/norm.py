"""RMSNorm that works under sequence parallelism.

megatron-core's torch norm (WrappedTorchNorm) asserts `not config.sequence_parallel`, and its
SP-capable norms need TransformerEngine or apex. MoE with TP > 1 must run sequence parallel
(MoELayer refuses to train otherwise), so the torch backend needs its own: the same math as
torch.nn.RMSNorm (F.rms_norm), plus the `sequence_parallel` tag on the weight so that
finalize_model_grads all-reduces its partial gradients across the TP group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelRMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Each TP rank sees a different slice of the sequence (or, for q/k norms, other heads):
        # its weight gradient is partial and must be summed over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
