"""RMSNorm for the torch backend: one Triton pass each way on GPU, torch's F.rms_norm elsewhere.

megatron-core's torch norm (WrappedTorchNorm) is torch.nn.RMSNorm, which asserts
`not config.sequence_parallel`; its SP-capable norms need TransformerEngine or apex. MoE with
TP > 1 must run sequence parallel, so this module tags the weight `sequence_parallel` and
finalize_model_grads all-reduces its partial gradients across the TP group.

On CUDA the forward reads each row once and keeps 1/rms for the backward, which reads x and dy
once, writes dx, and sums the weight gradient per program before one column-sum kernel, where
torch's kernels take well over the time the bytes need. Under torch.compile (train.compile) the norm stays F.rms_norm,
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
    def _rms_norm_fwd(x_ptr, residual_ptr, sum_ptr, w_ptr, y_ptr, rstd_ptr, hidden, eps, BLOCK: tl.constexpr,
                      ADD_RESIDUAL: tl.constexpr):
        # ADD_RESIDUAL: x + residual is written to sum_ptr, rounded to its dtype as a separate add
        # would round it, and that rounded sum is what is normalized.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD_RESIDUAL:
            x = (x + tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)).to(
                sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * hidden + cols, x, mask=mask)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * hidden + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, dsum_ptr, rows, hidden,
                      rows_per_program, BLOCK: tl.constexpr, ADD_GRAD: tl.constexpr):
        # ADD_GRAD: dx also takes the gradient that reached the residual sum itself (dsum_ptr).
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
            if ADD_GRAD:
                dx += tl.load(dsum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * x_hat
        tl.store(dw_partial_ptr + program.to(tl.int64) * hidden + cols, dw, mask=mask)

    @triton.jit
    def _column_sum(partial_ptr, out_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # The weight gradient from the per-program partials. torch's sum(0) of the [4·SMs, hidden]
        # partials walks each column serially; here each program
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
        dx, dw = _backward(dy, rows, weight, rstd, None)
        return dx.view(ctx.shape), dw, None


class _TritonAddRMSNorm(torch.autograd.Function):
    """(x + residual, rms_norm(x + residual)) in one pass; the backward hands x and residual the
    sum's gradient plus the norm's in one pass. Saves what _TritonRMSNorm saves, in its order
    (models/norm_recompute.py reads them); the normalized input in x's shape, not as rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        hidden = x.shape[-1]
        rows, res = x.reshape(-1, hidden).contiguous(), residual.reshape(-1, hidden).contiguous()
        # Allocated in x's shape, not as views of rows: megatron's make_viewless_tensor would
        # replace a view by a new tensor, and models/residual_norm.py finds the sum by identity.
        total, y = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        _forward(rows, weight, eps, y, rstd, residual=res, total=total)
        # The output itself, not a view of it: autograd saves an output without a reference back to
        # this node, a view would close a cycle (node -> view -> output -> node) that Python's gc
        # cannot see, leaking every forward that never runs a backward (megatron runs the
        # bias-dropout-add under enable_grad even in no_grad passes).
        ctx.save_for_backward(total, weight, rstd)
        ctx.shape, ctx.eps = x.shape, eps
        return total, y

    @staticmethod
    def backward(ctx, d_total: torch.Tensor | None, dy: torch.Tensor | None):
        total, weight, rstd = ctx.saved_tensors
        if dy is None:  # the norm's output was not used
            return d_total, d_total, torch.zeros_like(weight), None
        dx, dw = _backward(dy, total.view(-1, total.shape[-1]), weight, rstd, d_total)
        dx = dx.view(ctx.shape)
        return dx, dx, dw, None


def _backward(dy: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              d_sum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = rows.shape[-1]
    dy = dy.reshape(-1, hidden).contiguous()
    if d_sum is not None:
        d_sum = d_sum.reshape(-1, hidden).contiguous()
    dx = torch.empty_like(rows)
    sms = torch.cuda.get_device_properties(rows.device).multi_processor_count if rows.is_cuda else 2
    programs = min(rows.shape[0], 4 * sms)  # (CPU: the Triton interpreter, tests/scripts)
    rows_per_program = triton.cdiv(rows.shape[0], programs)
    partial = torch.empty(programs, hidden, dtype=torch.float32, device=rows.device)
    _rms_norm_bwd[(programs,)](dy, rows, weight, rstd, dx, partial, dx if d_sum is None else d_sum, rows.shape[0],
                               hidden, rows_per_program, BLOCK=triton.next_power_of_2(hidden),
                               ADD_GRAD=d_sum is not None, num_warps=8)
    dw = torch.empty_like(weight)
    _column_sum[(triton.cdiv(hidden, 32),)](partial, dw, programs, hidden, BLOCK_R=64, BLOCK_C=32, num_warps=4)
    return dx, dw


def _forward(rows: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, rstd: torch.Tensor,
             residual: torch.Tensor | None = None, total: torch.Tensor | None = None) -> None:
    """out = rms_norm(rows) (rows + residual, also written to `total`, when residual is given)."""
    hidden = rows.shape[-1]
    add = residual is not None
    _rms_norm_fwd[(rows.shape[0],)](rows, residual if add else rows, total if add else out, weight, out, rstd,
                                    hidden, eps, BLOCK=triton.next_power_of_2(hidden), ADD_RESIDUAL=add,
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

    # (sum, output) left by the residual add that produced this norm's input (models/residual_norm.py)
    precomputed: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ready = self.precomputed
        if ready is not None:
            self.precomputed = None
            # (under no_grad, e.g. megatron's output-discarding checkpoint, an output with a graph won't do)
            if ready[0] is x and (torch.is_grad_enabled() or not ready[1].requires_grad):
                return ready[1]
        return rms_norm(x, self.weight, self.eps)
