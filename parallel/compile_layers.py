"""`train.compile`: torch.compile each transformer layer (torchtitan's per-block compile).

A compiled layer runs its norms, residual adds, RoPE, SwiGLU and linears as one graph (Inductor
fuses the elementwise work; fewer kernels for the host to launch). megatron-core's layer breaks
into several graphs at a per-call warning unless parallel/compat's fix is on (`init_distributed`
applies it).
Compiled layers keep their parameters and state-dict keys (nn.Module.compile works in place).
"""
from __future__ import annotations

import torch


def compile_layers(model: torch.nn.Module) -> None:
    """Compile every TransformerLayer of this model (chunk) in place."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            module.compile()
