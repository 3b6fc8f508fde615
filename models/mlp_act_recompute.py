"""`train.recompute=[mlp_act]`: the dense MLP without its activation output kept for backward.

fc2 saves its input (the SwiGLU output, ffn × tokens) for its weight gradient; SwiGLU's own
backward needs only fc1's output, which is kept anyway. So the SwiGLU output's storage is freed
after fc2's forward and refilled from fc1's output when fc2's output gradient arrives, right
before fc2's backward reads it. The refill writes straight into the storage fc2 saved: megatron-
core's output-discarding checkpoint (CheckpointWithoutOutput, its `moe_act`) recomputes into a
new tensor under autograd and copies it over, ~1.6x the bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.transformer.mlp import MLP

from models.kernels import swiglu
from models.kernels.swiglu import swiglu_into


class ActivationRecomputeMLP(MLP):
    def _swiglu(self, fc1_out: torch.Tensor) -> torch.Tensor:
        if self.config.bias_activation_fusion:  # megatron's fused SwiGLU
            return bias_swiglu_impl(fc1_out, None)
        gate, up = torch.chunk(fc1_out, 2, dim=-1)
        return F.silu(gate) * up

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        swiglu = self.config.gated_linear_unit and self.config.activation_func is F.silu
        if per_token_scale is not None or not swiglu or self.config.add_bias_linear:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1_out, _ = self.linear_fc1(hidden_states)
        activation = self._swiglu(fc1_out)
        output, output_bias = self.linear_fc2(activation)
        if output.requires_grad:
            _free_until_backward(activation, fc1_out, output)
        return output, output_bias


def _free_until_backward(activation: torch.Tensor, fc1_out: torch.Tensor, output: torch.Tensor) -> None:
    storage = activation.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    # The hook lives as long as the graph (to the end of backward): it must not keep the refilled
    # storage or fc1's output alive past fc2's and SwiGLU's backward, so it lets go of them.
    pending = [(storage, activation, fc1_out)]

    def refill(grad: torch.Tensor) -> None:
        storage, activation, fc1_out = pending.pop()
        storage.resize_(nbytes)
        # A fresh tensor over the same storage: writing through `activation` (or a detach of it,
        # which shares its version counter) would fail fc2's saved-tensor version check.
        target = activation.new_empty(0).set_(storage, activation.storage_offset(), activation.shape,
                                              activation.stride())
        swiglu_into(fc1_out.detach(), target)

    output.register_hook(refill)


class TritonActivationRecomputeMLP(ActivationRecomputeMLP):
    """ActivationRecomputeMLP whose fused SwiGLU runs models/kernels/swiglu.py's kernels (CUDA)."""

    def _swiglu(self, fc1_out: torch.Tensor) -> torch.Tensor:
        if self.config.bias_activation_fusion:
            return swiglu.swiglu(fc1_out)
        return super()._swiglu(fc1_out)
