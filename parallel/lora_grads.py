"""The tensor-parallel sum of the LoRA factors that every TP rank holds whole.

A column-parallel linear's A and a row-parallel linear's B are replicated over the TP ranks, but
each rank's gradient of them covers only its own share of the linear's output (A) or input (B)
columns: the full gradient is their sum (models/kernels/lora_linear.py). It is summed once per step,
after the data-parallel reduction, as megatron does for the replicated norm weights under sequence
parallelism (a sum commutes with the DP reduction and the per-token scaling that follow or precede it).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from models.kernels.lora_linear import TP_PARTIAL_GRAD


def sum_partial_grads(chunks: list[torch.nn.Module]) -> None:
    """All-reduce (sum) the main grads of the replicated factors over the TP group, in one collective."""
    group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    grads = [p.main_grad for chunk in chunks for p in chunk.parameters()
             if p.requires_grad and getattr(p, TP_PARTIAL_GRAD, False)]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def with_partial_grad_sum(finalize: Callable[..., None]) -> Callable[..., None]:
    """The schedule's finalize_model_grads hook, followed by `sum_partial_grads` of its model chunks."""
    def finalize_model_grads(model: list, *args: Any, **kwargs: Any) -> None:
        finalize(model, *args, **kwargs)
        sum_partial_grads(model)
    return finalize_model_grads
