"""`train.compile`: torch.compile each transformer layer (torchtitan's per-block compile).

A compiled layer runs its norms, residual adds, RoPE, SwiGLU and linears as one graph (Inductor
fuses the elementwise work; fewer kernels for the host to launch). megatron-core 0.16.1's layer
breaks into 9 graphs without two fixes, both no-ops in eager mode:
- RowParallelLinear passes tp_group=None to its linear function (unused there), which then
  warns "tp_group is None" on every call: `warnings.warn` ends a graph. Resolve the default
  group without the warning.
- attention wraps linear_qkv / linear_proj in FineGrainedActivationOffloadingInterface even
  when offloading is off; dynamo cannot step into that context manager. Enter it only when on.
Compiled layers keep their parameters and state-dict keys (nn.Module.compile works in place).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

_patched = False


def _resolve_tp_group(tp_group, is_expert: bool = False, check_initialized: bool = True):
    """megatron's get_tensor_model_parallel_group_if_none without its per-call warning."""
    if not torch.distributed.is_initialized():
        return None
    if tp_group is not None or not ps.is_initialized():
        return tp_group
    if is_expert:
        return ps.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return ps.get_tensor_model_parallel_group(check_initialized=check_initialized)


def _patch_graph_breaks() -> None:
    global _patched
    if _patched:
        return
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import attention

    layers.get_tensor_model_parallel_group_if_none = _resolve_tp_group
    offload = attention.off_interface

    class OffloadWhenOn:
        """attention's `off_interface`: the offloading context only when offloading is on."""

        def __init__(self, on: bool, tensor: torch.Tensor, name: str):
            self.inner = offload(on, tensor, name) if on else None
            self.tensor = tensor

        def __enter__(self) -> torch.Tensor:
            return self.inner.__enter__() if self.inner is not None else self.tensor

        def __exit__(self, *exc) -> None:
            if self.inner is not None:
                self.inner.__exit__(*exc)

        group_commit = staticmethod(offload.group_commit)

    attention.off_interface = OffloadWhenOn
    _patched = True


def compile_layers(model: torch.nn.Module) -> None:
    """Compile every TransformerLayer of this model (chunk) in place."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    _patch_graph_breaks()
    for module in model.modules():
        if isinstance(module, TransformerLayer):
            module.compile()
