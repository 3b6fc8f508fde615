"""A frozen weight held in fp8 and dequantised in each GEMM (`lora.base_fp8`, a QLoRA-style memory
saving: one byte a weight instead of two or four).

Each output row is scaled so that its largest magnitude lands on e4m3's largest finite value (448)
and rounded to e4m3; the fp32 row scales stay beside it. The linear dequantises the whole weight into
the input's dtype for its forward GEMM, and again for the input-gradient GEMM in backward: only the
fp8 weight is held between them, never a dequantised copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
_MAX = 448.0
_AMAX_FLOOR = 1e-12  # an all-zero row gets a finite scale


def quantize_rows(weight: torch.Tensor, row_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [out, in] in e4m3, the fp32 scale [out] that dequantises each row); `row_amax` [out]: the
    largest magnitude of each row (of the whole row, where `weight` is a slice of its columns)."""
    scale = row_amax.float().clamp(min=_AMAX_FLOOR) / _MAX
    return (weight.float() / scale[:, None]).clamp(-_MAX, _MAX).to(E4M3), scale


def dequantize_rows(weight8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight8.float() * scale[:, None]).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x @ dequant(w8).T; backward returns the input gradient only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight8, scale)
        return F.linear(x, dequantize_rows(weight8, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight8, scale = ctx.saved_tensors
        return grad_out @ dequantize_rows(weight8, scale, grad_out.dtype), None, None


def dequantized_linear(x: torch.Tensor, weight8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _DequantLinear.apply(x, weight8, scale)
