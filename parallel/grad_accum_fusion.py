"""Weight-gradient GEMMs that accumulate straight into the fp32 main grads (megatron-core's
`gradient_accumulation_fusion`) without apex.

Megatron's DDP keeps an fp32 `main_grad` per parameter. Unfused, each linear's backward writes
its weight gradient in bf16, then a hook reads it back and adds it into main_grad: an extra
round trip over every weight per micro batch, and a
bf16 rounding of each micro batch's gradient. Fused, the wgrad GEMM accumulates into main_grad
in its epilogue (C = 1·C + gᵀx with fp32 C). megatron-core calls apex's
`fused_weight_gradient_mlp_cuda` for that; on CUDA torch does the same with `addmm(...,
out_dtype=float32)`, which is what this module hands megatron-core when apex is missing.
"""
from __future__ import annotations

import torch

from parallel import compat


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (fp32) += grad_outputᵀ @ total_input (2-D, bf16/fp16), accumulated in fp32."""
    torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (bf16/fp16, as the inputs) += grad_outputᵀ @ total_input."""
    main_grad.addmm_(grad_output.t(), total_input)


def enable(device: torch.device) -> bool:
    """Make megatron-core's gradient_accumulation_fusion usable on `device`; True when it is
    (apex's extension present, or these GEMMs served in its place). CUDA only: torch has no
    CPU kernel for addmm with out_dtype."""
    if device.type != "cuda":
        return False
    compat.provide_fused_weight_gradient(wgrad_gemm_accum_fp32, wgrad_gemm_accum_fp16)
    return True
