"""The MLP whose bias-free SwiGLU runs models/kernels/swiglu.py (torch backend, CUDA).

megatron-core's MLP calls its fused SwiGLU (`bias_swiglu_impl`, with bias_activation_fusion) as a
module function a spec cannot replace. These subclasses run the same MLP with that call on the
Triton kernels: fc1, SwiGLU, fc2. Anything else (a bias, per-token scales as experts pass them,
another activation, fusion off) is megatron's forward unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import HAVE_TE, MLP
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from models.kernels import swiglu


def fused_swiglu_applies(mlp: MLP) -> bool:
    """Where megatron's MLP calls its bias-free fused SwiGLU."""
    config = mlp.config
    return (config.bias_activation_fusion and not config.use_te_activation_func and config.gated_linear_unit
            and mlp.activation_func is F.silu and not config.add_bias_linear)


class TritonSwiGLUMLP(MLP):
    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not fused_swiglu_applies(self):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1_out, _ = self.linear_fc1(hidden_states)
        config = self.config
        offload = config.cpu_offloading and config.cpu_offloading_activations and HAVE_TE  # (as megatron's MLP)
        activation = swiglu.swiglu(fc1_out, config.activation_func_fp8_input_store, offload)
        return self.linear_fc2(activation)


class TritonSwiGLUSharedExpertMLP(SharedExpertMLP, TritonSwiGLUMLP):
    """megatron's shared experts (their gate included) over TritonSwiGLUMLP's forward."""
