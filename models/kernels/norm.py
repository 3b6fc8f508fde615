"""RMSNorm for the torch backend: one Triton pass each way on GPU, torch's F.rms_norm elsewhere.

megatron-core's torch norm (WrappedTorchNorm) is torch.nn.RMSNorm, which asserts
`not config.sequence_parallel`; its SP-capable norms need TransformerEngine or apex. MoE with
TP > 1 must run sequence parallel, so this module tags the weight `sequence_parallel` and
finalize_model_grads all-reduces its partial gradients across the TP group.

On CUDA the forward reads each row once and keeps 1/rms for the backward, which reads x and dy
once, writes dx, and sums the weight gradient per program before one column-sum kernel: at the
1.14B bench shape (33 norms of 8192 x 2048 a step) torch's kernels took ~3.1 ms of the step
where the bytes need ~1.2 ms. Under torch.compile (train.compile) the norm stays F.rms_norm,
which inductor fuses itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    @triton.jit
    def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, hidden, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * hidden + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, hidden, rows_per_program,
                      BLOCK: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = program.to(tl.int64) * rows_per_program  # int64 rows: offsets past 2**31 stay exact
        for row in range(first, tl.minimum(first + rows_per_program, rows)):
            offs = row * hidden + cols
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            w_dy = w * dy
            dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=0) / hidden)) * rstd
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * x_hat
        tl.store(dw_partial_ptr + program.to(tl.int64) * hidden + cols, dw, mask=mask)

    @triton.jit
    def _column_sum(partial_ptr, out_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # The weight gradient from the per-program partials. torch's sum(0) of the [4·SMs, hidden]
        # partials walks each column serially (12 µs a norm at the bench shape); here each program
        # sums a narrow column strip in [BLOCK_R, BLOCK_C] tiles.
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = c < cols
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for first in range(0, rows, BLOCK_R):
            r = first + tl.arange(0, BLOCK_R)
            tile_mask = (r[:, None] < rows) & col_mask[None, :]
            acc += tl.sum(tl.load(partial_ptr + r[:, None] * cols + c[None, :], mask=tile_mask, other=0.0), axis=0)
        tl.store(out_ptr + c, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden).contiguous()
        y = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        _forward(rows, weight, eps, y, rstd)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape, ctx.eps = x.shape, eps
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        hidden = rows.shape[-1]
        dy = dy.reshape(-1, hidden).contiguous()
        dx = torch.empty_like(rows)
        sms = torch.cuda.get_device_properties(rows.device).multi_processor_count if rows.is_cuda else 2
        programs = min(rows.shape[0], 4 * sms)  # (CPU: the Triton interpreter, tests/scripts)
        rows_per_program = triton.cdiv(rows.shape[0], programs)
        partial = torch.empty(programs, hidden, dtype=torch.float32, device=rows.device)
        _rms_norm_bwd[(programs,)](dy, rows, weight, rstd, dx, partial, rows.shape[0], hidden, rows_per_program,
                                   BLOCK=triton.next_power_of_2(hidden), num_warps=8)
        dw = torch.empty_like(weight)
        _column_sum[(triton.cdiv(hidden, 32),)](partial, dw, programs, hidden, BLOCK_R=64, BLOCK_C=32, num_warps=4)
        return dx.view(ctx.shape), dw, None


def _forward(rows: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, rstd: torch.Tensor) -> None:
    hidden = rows.shape[-1]
    _rms_norm_fwd[(rows.shape[0],)](rows, weight, out, rstd, hidden, eps, BLOCK=triton.next_power_of_2(hidden),
                                    num_warps=8)


def rms_norm_forward_into(rows: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """The Triton forward of contiguous [rows, hidden] into `out` (contiguous, same numel): the
    in-place refill of models/norm_recompute.py. The kernel writes raw memory, so autograd's
    version counter on `out` (saved by the next linear) is untouched."""
    _forward(rows, weight, eps, out, torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dim; the Triton kernels on CUDA (outside torch.compile)."""
    if triton is not None and x.is_cuda and not torch.compiler.is_compiling():
        return _TritonRMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(torch.nn.Module):
    """The torch backend's RMSNorm (megatron norm constructor signature)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Each TP rank sees a different slice of the sequence (or, for q/k norms, other heads):
        # its weight gradient is partial and must be summed over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
