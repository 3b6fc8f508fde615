"""megatron-core's tensor-parallel linears with a LoRA adapter beside the frozen base weight.

y = x W^T + scale * dropout(x) A^T B^T (models/lora.py). The factors are split so that the adapter
needs no communication of activations beyond the base linear's own:

- column-parallel base (W split by output rows): A [rank, in] is replicated, B [out / tp, rank] is
  split like W. The input is made parallel once (identity forward, gradient all-reduced in backward;
  or gathered over the sequence under sequence parallelism) and both branches read it, so their input
  gradients are reduced together by that one collective.
- row-parallel base (W split by input columns): A [rank, in / tp] is split like W, B [out, rank] is
  replicated. The adapter's partial output is added before the base's all-reduce (or reduce-scatter).

Each rank's gradient of its replicated factor (A of a column linear, B of a row linear) is a partial
sum over the tensor-parallel ranks; the parameter carries TP_PARTIAL_GRAD and
parallel/lora_grads.py sums those gradients once per step (their size, not the activations').

With `train.precision=fp8` the base runs through the fp8 linears' GEMMs (the Fp8 variants). With
`base_fp8` the frozen weight is held in fp8 and dequantised in each GEMM (models/kernels/fp8_weight.py).

Checkpoint keys are `<linear>.lora_a` / `<linear>.lora_b`, split like the base weight along the
same axis; fc1's B (`swiglu`) is stored as [gate rows; up rows] like fc1's weight, so every layout
saves the same global tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from models.kernels.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from models.kernels.fp8_weight import E4M3, dequantized_linear, quantize_rows
from models.lora import LoraOptions

TP_PARTIAL_GRAD = "lora_tp_partial_grad"  # a replicated factor whose gradient is summed over TP ranks


class _Lora:
    """The adapter of a megatron linear; `_TP_AXES` names the axis each tensor is split on."""

    _TP_AXES: dict[str, int] = {}

    def __init__(self, input_size: int, output_size: int, *args, lora: LoraOptions, swiglu: bool = False, **kwargs):
        super().__init__(input_size, output_size, *args, **kwargs)
        self.lora, self.swiglu = lora, swiglu
        self.adapter_on = True  # models.lora.adapters_off: the base alone
        a_shape, b_shape = self._factor_shapes(lora.rank)
        # (values come from models.init, the same global tensors in every layout)
        self.lora_a = torch.nn.Parameter(torch.zeros(a_shape, dtype=self.weight.dtype, device=self.weight.device))
        self.lora_b = torch.nn.Parameter(torch.zeros(b_shape, dtype=self.weight.dtype, device=self.weight.device))
        for name in ("lora_a", "lora_b"):
            param = getattr(self, name)
            # an expert's factors are reduced over the expert-data-parallel ranks, as its weight is
            param.allreduce = getattr(self.weight, "allreduce", True)
            if name in self._TP_AXES:
                set_tensor_model_parallel_attributes(param, True, self._TP_AXES[name], 1)
            else:
                setattr(param, TP_PARTIAL_GRAD, True)

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        raise NotImplementedError

    def _base(self, input: torch.Tensor, weight: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The frozen base linear's output: megatron's (or the fp8 one's), or with `base_fp8` the
        dequantising GEMM of the weight held in fp8 (quantised at the first forward: after the base
        weights are loaded)."""
        if not self.lora.base_fp8:
            return super()._forward_impl(input=input, weight=weight, **kwargs)
        if self.weight.dtype != E4M3:
            self._hold_weight_in_fp8()
        out = dequantized_linear(input, self.weight, self.weight_scale)
        return out if kwargs.get("bias") is None else out + kwargs["bias"]

    @torch.no_grad()
    def _hold_weight_in_fp8(self) -> None:
        amax = self.weight.abs().amax(dim=1).float()
        if self._TP_AXES["weight"] == 1:  # (a row split over TP ranks: its scale from the whole row)
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=self.tp_group)
        self.weight.data, scale = quantize_rows(self.weight, amax)
        self.register_buffer("weight_scale", scale, persistent=False)

    def _with_delta(self, out: torch.Tensor, x: torch.Tensor, parallel_input: bool) -> torch.Tensor:
        return out + self._delta(x, parallel_input) if self.adapter_on else out

    def _delta(self, x: torch.Tensor, parallel_input: bool) -> torch.Tensor:
        """scale * dropout(x) A^T B^T; `parallel_input`: x differs between TP ranks (its dropout mask must too)."""
        if self.training and self.lora.dropout > 0:
            if parallel_input:
                with get_cuda_rng_tracker().fork():
                    x = F.dropout(x, self.lora.dropout)
            else:
                x = F.dropout(x, self.lora.dropout)
        return F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora.scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(state_dict, prefix, self._TP_AXES, sharded_offsets,
                                                  tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        if self.swiglu:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            out[f"{prefix}lora_b"] = apply_swiglu_sharded_factory(out[f"{prefix}lora_b"], sharded_offsets, singleton)
        return out


class _LoraColumn(_Lora):
    _TP_AXES = {"weight": 0, "bias": 0, "lora_b": 0}

    def _factor_shapes(self, rank):
        return (rank, self.input_size), (self.output_size_per_partition, rank)

    def _forward_impl(self, input, weight, **kwargs):
        # the input made parallel here, once for both branches (megatron's linear would do it inside)
        if kwargs.get("sequence_parallel"):
            input = gather_from_sequence_parallel_region(input, group=self.tp_group)
        elif kwargs.get("allreduce_dgrad"):
            input = copy_to_tensor_model_parallel_region(input, group=self.tp_group)
        kwargs.update(sequence_parallel=False, allreduce_dgrad=False)
        return self._with_delta(self._base(input, weight, kwargs), input, False)


class _LoraRow(_Lora):
    _TP_AXES = {"weight": 1, "lora_a": 1}

    def _factor_shapes(self, rank):
        return (rank, self.input_size_per_partition), (self.output_size, rank)

    def _forward_impl(self, input, weight, **kwargs):
        # a partial sum like the base's output: the caller reduces both at once
        return self._with_delta(self._base(input, weight, kwargs), input, True)


class LoraColumnParallelLinear(_LoraColumn, ColumnParallelLinear):
    pass


class LoraRowParallelLinear(_LoraRow, RowParallelLinear):
    pass


class LoraFp8ColumnParallelLinear(_LoraColumn, Fp8ColumnParallelLinear):
    """The frozen base through fp8 GEMMs (models/kernels/fp8_linear.py), the adapter in the input's dtype."""
    frozen_fp8 = True


class LoraFp8RowParallelLinear(_LoraRow, Fp8RowParallelLinear):
    frozen_fp8 = True
