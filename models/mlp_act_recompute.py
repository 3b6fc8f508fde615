"""`train.recompute=[mlp_act]`: the dense MLP without its activation output kept for backward.

fc2 saves its input (the SwiGLU output, ffn × tokens) for its weight gradient; SwiGLU's own
backward needs only fc1's output, which is kept anyway. So the SwiGLU output is dropped after
fc2's forward and recomputed from fc1's output right before fc2's backward: megatron-core's
output-discarding checkpoint (CheckpointWithoutOutput), as its `moe_act` does for experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.tensor_parallel import CheckpointWithoutOutput
from megatron.core.transformer.mlp import MLP


class ActivationRecomputeMLP(MLP):
    def _swiglu(self, fc1_out: torch.Tensor) -> torch.Tensor:
        if self.config.bias_activation_fusion:  # megatron's fused SwiGLU (models/kernels/swiglu.py's backward)
            return bias_swiglu_impl(fc1_out, None)
        gate, up = torch.chunk(fc1_out, 2, dim=-1)
        return F.silu(gate) * up

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        swiglu = self.config.gated_linear_unit and self.config.activation_func is F.silu
        if per_token_scale is not None or not swiglu or self.config.add_bias_linear:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1_out, _ = self.linear_fc1(hidden_states)
        checkpoint = CheckpointWithoutOutput(fp8=None)  # (fp8=False would mean fp8: it tests `is not None`)
        activation = checkpoint.checkpoint(self._swiglu, fc1_out)
        output, output_bias = self.linear_fc2(activation)
        checkpoint.discard_output_and_register_recompute(output)
        return output, output_bias
