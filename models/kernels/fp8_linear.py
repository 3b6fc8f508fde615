"""fp8 GEMMs for the transformer layers' linears (`train.precision=fp8`), without TransformerEngine.

Each linear's three GEMMs (output, input grad, weight grad) run through `torch._scaled_mm` (on CUDA) with
one scale per tensor, taken from the tensor's own amax at every call: dynamic tensorwise
scaling, torchao's `tensorwise` float8 recipe. Inputs and weights are cast to e4m3, output
gradients to e5m2 (range over precision, as in TE's `hybrid` format); the forward GEMM uses
fast accumulation, the two gradient GEMMs do not (torchao's defaults). Everything between the
linears, the embedding and the output layer stay bf16.

`_scaled_mm` reads its first operand row-major and its second column-major, so x, w and dy are
each cast into the layouts their GEMMs read by one Triton pass (`_cast_kernel`) that writes
either or both. Backward holds x as its fp8 transpose (half the bytes of the bf16 input a
plain linear holds) or, where x is held anyway (the core attention's output; an input a
recompute refills), x itself; the weight is cast again in backward from the parameter with its
forward amax.

`Fp8ColumnParallelLinear` / `Fp8RowParallelLinear` are megatron-core's linears with this GEMM;
they fall back to megatron's own where it does not apply (a bias, tensor-parallel
communication inside the linear, dims not multiples of 16, non-bf16 input).
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_MAX = {E4M3: 448.0, E5M2: 57344.0}
_AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale


if triton is not None:
    @triton.jit
    def _cast_kernel(x_ptr, amax_ptr, inv_scale_ptr, out_ptr, out_t_ptr, rows, cols, FP8_MAX: tl.constexpr,
                     AMAX_FLOOR: tl.constexpr, ROWWISE: tl.constexpr, COLWISE: tl.constexpr, BR: tl.constexpr,
                     BC: tl.constexpr):
        # the scale from the amax here, not in torch: four scalar kernels fewer per cast
        amax = tl.maximum(tl.load(amax_ptr).to(tl.float32), AMAX_FLOOR)
        scale = tl.math.div_rn(FP8_MAX, amax)  # (IEEE division, as torch's: the same fp8 bits)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(inv_scale_ptr, tl.math.div_rn(amax, FP8_MAX))
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask).to(tl.float32)
        y = tl.clamp(x * scale, -FP8_MAX, FP8_MAX)
        if ROWWISE:
            tl.store(out_ptr + r[:, None] * cols + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
        if COLWISE:
            tl.store(out_t_ptr + c[None, :] * rows + r[:, None], y.to(out_t_ptr.dtype.element_ty), mask=mask)


def amax(t: torch.Tensor) -> torch.Tensor:
    """`t`'s largest magnitude, a 0-dim tensor in t's dtype (exact: a max of t's values); no host sync."""
    return torch.linalg.vector_norm(t, float("inf"))  # one reduction, no |t| temporary


def cast_to_fp8(t: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor, rowwise: bool = True,
                colwise: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """2D `t` scaled so that `amax` lands on `dtype`'s largest finite value, in fp8, saturated:
    (row-major, transposed contiguous, the dequantizing scale amax / max as an fp32 scalar), each
    layout only when asked (else None)."""
    if triton is not None and t.is_cuda and t.is_contiguous():
        rows, cols = t.shape
        out = torch.empty(rows, cols, dtype=dtype, device=t.device) if rowwise else None
        out_t = torch.empty(cols, rows, dtype=dtype, device=t.device) if colwise else None
        inv_scale = torch.empty((), dtype=torch.float32, device=t.device)
        grid = (triton.cdiv(rows, 64), triton.cdiv(cols, 64))
        _cast_kernel[grid](t, amax, inv_scale, out, out_t, rows, cols, FP8_MAX=_MAX[dtype], AMAX_FLOOR=_AMAX_FLOOR,
                           ROWWISE=rowwise, COLWISE=colwise, BR=64, BC=64, num_warps=4)
        return out, out_t, inv_scale
    bounded = amax.float().clamp(min=_AMAX_FLOOR)
    q = scaled_cast(t, _MAX[dtype] / bounded, dtype)
    return (q if rowwise else None), (q.t().contiguous() if colwise else None), bounded / _MAX[dtype]


def scaled_cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t * scale` in fp8, saturated at the format's largest finite value (what _cast_kernel writes)."""
    return (t.float() * scale).clamp(-_MAX[dtype], _MAX[dtype]).to(dtype)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, use_fast_accum: bool = False) -> torch.Tensor:
    """(a @ b) * scale_a * scale_b of fp8 operands, accumulated in fp32, as `out_dtype`.

    CUDA: `torch._scaled_mm` (fp8 tensor cores). CPU: the same product of the operands widened
    to fp32 (every fp8 value is exact in fp32), since torch's CPU `_scaled_mm` is a scalar
    fallback hundreds of times slower than an fp32 matmul; tests/unit/test_fp8_linear.py checks
    the two agree."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x @ w.T with fp8 GEMMs. With `main_grad` (megatron's gradient_accumulation_fusion) the
    weight gradient is added into it and autograd gets megatron's placeholder instead.

    Backward holds x as its fp8 transpose, or, with `keep_input` (x is held anyway by another
    consumer, or a recompute refills its storage before this backward), x itself, cast again
    there. The weight (a parameter, alive anyway) is held as is and cast again with its forward
    amax: an fp8 copy per linear would hold 1 GB at the 1.14B bench shape."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor | None,
                keep_input: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x_amax, w_amax = amax(x2), amax(weight)
        wgrad = weight.requires_grad
        x8, x8_t, x_inv = cast_to_fp8(x2, E4M3, x_amax, colwise=wgrad and not keep_input)
        w8, _, w_inv = cast_to_fp8(weight, E4M3, w_amax)
        out = scaled_mm(x8, w8.t(), x_inv, w_inv, out_dtype=x.dtype, use_fast_accum=True)
        saved_x = (x if keep_input else x8_t) if wgrad else None
        ctx.save_for_backward(saved_x, x_amax, x_inv, weight if x.requires_grad else None, w_amax)
        ctx.x_shape, ctx.x_dtype, ctx.main_grad, ctx.keep_input = x.shape, x.dtype, main_grad, keep_input
        ctx.weight = weight
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved_x, x_amax, x_inv, weight, w_amax = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        dy8, dy8_t, dy_inv = cast_to_fp8(dy, E5M2, amax(dy), rowwise=weight is not None,
                                         colwise=saved_x is not None)
        grad_x = grad_w = None
        if weight is not None:
            _, w8_t, w_inv = cast_to_fp8(weight, E4M3, w_amax, rowwise=False, colwise=True)
            grad_x = scaled_mm(dy8, w8_t.t(), dy_inv, w_inv, out_dtype=ctx.x_dtype).view(ctx.x_shape)
            del dy8, w8_t  # freed before the weight-gradient GEMM allocates its output
        if saved_x is not None:
            x8_t = saved_x
            if ctx.keep_input:  # (a strided x, as the core attention's output is, gets copied here, not held)
                x2 = saved_x.reshape(-1, saved_x.shape[-1]).contiguous()
                x8_t = cast_to_fp8(x2, E4M3, x_amax, rowwise=False, colwise=True)[1]
            main_grad = ctx.main_grad
            grad_w = scaled_mm(dy8_t, x8_t.t(), dy_inv, x_inv,
                               out_dtype=ctx.x_dtype if main_grad is None else main_grad.dtype)
            if main_grad is not None:
                main_grad.add_(grad_w)
                grad_w = _main_grad_placeholder(ctx.weight, ctx.x_dtype)
        return grad_x, grad_w, None, None


def _main_grad_placeholder(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """What megatron's fused-accumulation linear hands autograd once the gradient is in main_grad:
    an unused tensor where DDP's hook checks `grad_added_to_main_grad`, else nothing."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    shape = weight.main_grad.shape
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(shape, dtype=dtype, device=weight.device)
    return torch.empty(shape, dtype=dtype, device=weight.device)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, gradient_accumulation_fusion: bool = False,
               keep_input: bool = False) -> torch.Tensor:
    """`x @ weight.T` through fp8 GEMMs; x [..., k], weight [n, k], both bf16, k and n multiples of 16.
    `keep_input`: backward reads x itself, not an fp8 copy of it (see _Fp8Linear)."""
    main_grad = getattr(weight, "main_grad", None) if gradient_accumulation_fusion else None
    return _Fp8Linear.apply(x, weight, main_grad, keep_input)


def _fp8_applies(x: torch.Tensor, weight: torch.Tensor, kw: dict, frozen: bool = False) -> bool:
    """`frozen`: a weight that gets no gradient (a LoRA base) runs fp8 GEMMs too."""
    return (kw.get("bias") is None and not kw.get("sequence_parallel") and not kw.get("allreduce_dgrad")
            and kw.get("grad_output_buffer") is None and x.dtype == weight.dtype == torch.bfloat16
            and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0 and (weight.requires_grad or frozen))


class _Fp8Forward:
    """megatron's linear forward with the fp8 GEMM where `_fp8_applies`, its own elsewhere.
    `keep_input` (a spec param): the input is held anyway, by another consumer or a recompute.
    `frozen_fp8`: also when the weight is frozen (forward and input-gradient GEMMs only)."""

    frozen_fp8 = False

    def __init__(self, *args, keep_input: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_input = keep_input

    def _forward_impl(self, input, weight, *args, **kwargs):
        if args or not _fp8_applies(input, weight, kwargs, self.frozen_fp8):
            return super()._forward_impl(input, weight, *args, **kwargs)
        return fp8_linear(input, weight, kwargs.get("gradient_accumulation_fusion", False), self.keep_input)


class Fp8ColumnParallelLinear(_Fp8Forward, ColumnParallelLinear):
    pass


class Fp8RowParallelLinear(_Fp8Forward, RowParallelLinear):
    pass
