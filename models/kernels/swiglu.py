"""SwiGLU forward and backward as one Triton pass each (torch backend, CUDA).

megatron-core's fused SwiGLU (bias_activation_fusion) runs a torch.compile'd `swiglu` forward and
`swiglu_back` backward (both gradient halves, then a cat), which moves more bytes than the
gradient needs. Here each is one kernel that reads a row's gate and up once (both at the HBM
rate, as fast as the compiled forward); the backward writes both halves of dy in place. `swiglu_into` writes the
forward into an existing tensor: the recompute of `train.recompute=[mlp_act]` refills the
storage fc2 saved instead of computing a new tensor and copying it over. `swiglu` is megatron's
bias-free fused SwiGLU on these kernels (the MLPs of models/swiglu_mlp.py and
models/mlp_act_recompute.py call it). Launch sizes (BLOCK,
WARPS) chosen with `python -m bench.bench_swiglu` (results: bench/results/).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    @triton.jit
    def _swiglu_back_kernel(g_ptr, y_ptr, dy_ptr, ffn, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < ffn
        g = tl.load(g_ptr + row * ffn + cols, mask=mask).to(tl.float32)
        gate = tl.load(y_ptr + row * 2 * ffn + cols, mask=mask).to(tl.float32)
        up = tl.load(y_ptr + row * 2 * ffn + ffn + cols, mask=mask).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = g * sig * (1.0 + gate * (1.0 - sig)) * up  # d/dgate of silu(gate) * up
        d_up = g * gate * sig
        tl.store(dy_ptr + row * 2 * ffn + cols, d_gate.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + row * 2 * ffn + ffn + cols, d_up.to(dy_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_kernel(y_ptr, out_ptr, ffn, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < ffn
        gate = tl.load(y_ptr + row * 2 * ffn + cols, mask=mask).to(tl.float32)
        up = tl.load(y_ptr + row * 2 * ffn + ffn + cols, mask=mask).to(tl.float32)
        tl.store(out_ptr + row * ffn + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


BLOCK, WARPS = 8192, 16  # the fastest launch size of bench_swiglu at the bench shape, both ways


def swiglu_into(y: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(y1) * y2 for y = [y1 | y2] along the last dim; `out` contiguous, y's shape but half
    its last dim. Triton on CUDA, torch's ops elsewhere."""
    if triton is not None and y.is_cuda and not torch.compiler.is_compiling():
        _swiglu_kernel_into(y, out)
    else:
        gate, up = torch.chunk(y, 2, dim=-1)
        torch.mul(torch.nn.functional.silu(gate), up, out=out)


def _swiglu_kernel_into(y: torch.Tensor, out: torch.Tensor) -> None:
    ffn = out.shape[-1]
    y = y.contiguous()
    block = min(BLOCK, triton.next_power_of_2(ffn))
    _swiglu_kernel[(out.numel() // ffn, triton.cdiv(ffn, block))](y, out, ffn, BLOCK=block, num_warps=WARPS)


def swiglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(silu(y1) * y2)/dy for y = [y1 | y2] along the last dim, given the output grad `g`."""
    ffn = g.shape[-1]
    g, y = g.contiguous(), y.contiguous()
    dy = torch.empty_like(y)
    block = min(BLOCK, triton.next_power_of_2(ffn))
    _swiglu_back_kernel[(g.numel() // ffn, triton.cdiv(ffn, block))](g, y, dy, ffn, BLOCK=block, num_warps=WARPS)
    return dy


class SwiGLUFunction(torch.autograd.Function):
    """megatron-core's bias-free SwiGLUFunction (same arguments, same saved input) on these kernels."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, fp8_input_store: bool, cpu_offload_input: bool) -> torch.Tensor:
        input_for_backward = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        if cpu_offload_input:
            input_for_backward.activation_offloading = True
        ctx.save_for_backward(input_for_backward)
        ctx.ori_input_dtype = input.dtype
        ctx.fp8_input_store = fp8_input_store
        out = input.new_empty((*input.shape[:-1], input.shape[-1] // 2))
        swiglu_into(input, out)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (input,) = ctx.saved_tensors
        input = input.to(ctx.ori_input_dtype) if ctx.fp8_input_store else input
        return swiglu_back(grad_output, input), None, None


def swiglu(input: torch.Tensor, fp8_input_store: bool = False, cpu_offload_input: bool = False) -> torch.Tensor:
    """silu(y1) * y2 for input = [y1 | y2] along the last dim (2D or 3D), with the kernels' backward:
    megatron's `bias_swiglu_impl(input, None, ...)` on them."""
    shape = input.shape
    assert len(shape) in (2, 3), shape
    out = SwiGLUFunction.apply(input.view(-1, shape[-1]), fp8_input_store, cpu_offload_input)
    return out if len(shape) == 2 else out.view(shape[0], shape[1], -1)
