"""MoE experts for the torch backend: one grouped GEMM per projection on GPU.

megatron-core 0.16.1 runs experts as grouped GEMMs only through TransformerEngine or the
separate `grouped_gemm` package; otherwise SequentialMLP loops over the local experts, one
small GEMM each (128 experts → 256 launches per layer and direction). This module keeps
SequentialMLP's parameters — so checkpoints, init, HF conversion and the CPU path are
unchanged — and on CUDA computes all experts at once with `torch._grouped_mm` over the stacked
expert weights, the SwiGLU between the two on models/kernels/swiglu.py's kernels. `grouped` takes
the tokens per expert as a device tensor too (models/fused_moe.py: no host copy). Elsewhere (CPU,
fp8, probs applied on the input) it is SequentialMLP itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from models.kernels import swiglu


def grouped_mm_available(device: torch.device) -> bool:
    # torch's grouped GEMM kernel needs Hopper or newer (sm90+).
    return (device.type == "cuda" and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] >= 9)


class GroupedGemmExperts(SequentialMLP):
    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        if not self._grouped_path(hidden):
            return super().forward(hidden, tokens_per_expert, probs)
        return self.grouped(hidden, tokens_per_expert, probs), None

    def grouped(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor,
                probs: torch.Tensor | None = None) -> torch.Tensor:
        """All experts on `hidden` (rows grouped by expert, `tokens_per_expert` rows each, a host or
        device tensor), the router weights `probs` applied before the second linear where given."""
        # Weights as [experts, in, out] views of the [out, in] parameters: column-major per expert,
        # the layout the kernel reads without a copy beyond the stack.
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        # Tokens arrive grouped by expert; offs[i] is where expert i's rows end.
        offs = torch.cumsum(tokens_per_expert.to(hidden.device), 0, dtype=torch.int32)
        h = torch._grouped_mm(hidden, w1, offs=offs)
        if self.config.gated_linear_unit and self.config.activation_func is F.silu and h.is_cuda:
            h = swiglu.swiglu(h)  # megatron's fc1 is [gate; up]
        elif self.config.gated_linear_unit:
            gate, up = h.chunk(2, dim=-1)
            h = self.config.activation_func(gate) * up
        else:
            h = self.config.activation_func(h)
        if probs is not None:
            h = (h * probs.unsqueeze(-1)).to(hidden.dtype)  # router weights, as megatron's MLP applies them
        return torch._grouped_mm(h, w2, offs=offs)

    def _grouped_path(self, hidden: torch.Tensor) -> bool:
        """Where `grouped` serves this forward."""
        if self.num_local_experts == 1 or self.config.fp8 or self.config.fp4 or self.config.moe_apply_probs_on_input:
            return False
        if hidden.dtype != torch.bfloat16 or not grouped_mm_available(hidden.device):
            return False
        fc1 = self.local_experts[0].linear_fc1
        # The expert linears must be plain matmuls: no bias, no communication of their own
        # (expert TP 1, or the dispatcher doing the expert-TP collectives).
        return fc1.bias is None and self.local_experts[0].linear_fc2.bias is None and (
            self.config.expert_tensor_parallel_size == 1 or getattr(fc1, "explicit_expert_comm", False))
