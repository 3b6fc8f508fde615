"""Token permute and combine of a dropless MoE layer, with no copy of token counts to the host.

megatron-core's unfused permute (no TransformerEngine) selects the routed tokens with
`masked_select`, whose output size the host must read, and its dispatcher copies the tokens per
expert to the host for the expert GEMMs. Here every token picks exactly top-k experts, so all
sizes are known up front: the rows are ordered by expert (tokens ascending within an expert, as
megatron orders them) with a stable sort on the device, and the grouped GEMMs take their offsets
as a device tensor.

`Routing` holds, for T tokens and k experts each: `pos[t, j]`, the row of token t's j-th expert in
the permuted order, its weight `weights[t, j]` (the router probability) and the tokens per expert.
`permute` copies each token to its k rows; `combine` sums each token's k expert outputs, weighted by
the router probabilities (megatron applies them inside the expert, before its second linear; the
result is the same function). Each backward is the other pass: the permute's gradient sums a
token's k rows, the combine's scatters the weighted gradient to them, and the weights' gradient is
the dot product of the output gradient with each expert output. Every row is written once: no
atomics, deterministic. Triton kernels on CUDA tensors, torch's ops elsewhere (the same function).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass
class Routing:
    pos: torch.Tensor                # [T, k] int64: permuted row of (token, j)
    weights: torch.Tensor            # [T, k]: router probability of (token, j)
    tokens_per_expert: torch.Tensor  # [E] int64, on the device

    @staticmethod
    def from_map(probs: torch.Tensor, routing_map: torch.Tensor, topk: int) -> "Routing":
        """From a router's dense [T, E] probabilities and boolean map with exactly `topk` experts per row."""
        tokens, experts = routing_map.shape
        # Each row's experts in increasing order: a stable sort puts the selected columns first, in order.
        expert_ids = torch.sort(routing_map.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :topk]
        weights = probs.gather(1, expert_ids)
        order = torch.sort(expert_ids.reshape(-1), stable=True).indices  # expert-major, tokens ascending
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=order.device)
        return Routing(pos.view(tokens, topk), weights, routing_map.sum(dim=0))


def permute(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, H] -> [T * k, H]: row pos[t, j] is x[t]."""
    return _Permute.apply(x, routing.pos)


def combine(y: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T * k, H] -> [T, H]: sum over j of weights[t, j] * y[pos[t, j]], accumulated in fp32."""
    return _Combine.apply(y, routing.weights, routing.pos)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pos)
        return scatter_rows(x, pos, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pos,) = ctx.saved_tensors
        return gather_sum(grad, pos, None), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, weights, pos)
        return gather_sum(y, pos, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, weights, pos = ctx.saved_tensors
        grad_y = scatter_rows(grad, pos, weights) if ctx.needs_input_grad[0] else None
        grad_w = gather_dot(y, pos, grad).to(weights.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None


def _triton(use: bool | None, *tensors: torch.Tensor) -> bool:
    # `use` None: Triton on CUDA tensors; True also runs the kernels elsewhere (Triton's interpreter).
    return triton is not None and (use or (use is None and all(t.is_cuda for t in tensors)))


def scatter_rows(x: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None,
                 use_triton: bool | None = None) -> torch.Tensor:
    """out[pos[t, j]] = x[t] (times weights[t, j]); out has T * k rows of x's dtype."""
    tokens, k = pos.shape
    out = x.new_empty(tokens * k, x.shape[1])
    if _triton(use_triton, x):
        x = x.contiguous()
        block = _block(x.shape[1])
        _scatter_rows_kernel[(tokens, triton.cdiv(x.shape[1], block))](
            x, pos, weights if weights is not None else x, out, x.shape[1], K=k, WEIGHTED=weights is not None,
            BLOCK=block)
        return out
    rows = x.unsqueeze(1).expand(tokens, k, x.shape[1])
    if weights is not None:
        rows = (rows.to(_acc(x)) * weights.unsqueeze(-1).to(_acc(x))).to(x.dtype)
    out[pos.reshape(-1)] = rows.reshape(tokens * k, -1)
    return out


def gather_sum(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None,
               use_triton: bool | None = None) -> torch.Tensor:
    """out[t] = sum over j of y[pos[t, j]] (times weights[t, j]), accumulated in fp32; y's dtype."""
    tokens, k = pos.shape
    if _triton(use_triton, y):
        y = y.contiguous()
        out = y.new_empty(tokens, y.shape[1])
        block = _block(y.shape[1])
        _gather_sum_kernel[(tokens, triton.cdiv(y.shape[1], block))](
            y, pos, weights if weights is not None else y, out, y.shape[1], K=k, WEIGHTED=weights is not None,
            BLOCK=block)
        return out
    rows = y[pos.reshape(-1)].view(tokens, k, -1).to(_acc(y))
    if weights is not None:
        rows = rows * weights.unsqueeze(-1).to(_acc(y))
    return rows.sum(dim=1).to(y.dtype)


def gather_dot(y: torch.Tensor, pos: torch.Tensor, g: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """[T, k]: the dot product of g[t] with y[pos[t, j]], in fp32 (fp64 for fp64 inputs)."""
    tokens, k = pos.shape
    if _triton(use_triton, y, g):
        y, g = y.contiguous(), g.contiguous()
        out = torch.empty(tokens, k, dtype=torch.float32, device=y.device)
        _gather_dot_kernel[(tokens,)](y, pos, g, out, y.shape[1], K=k, BLOCK=_block(y.shape[1]))
        return out
    return (y[pos.reshape(-1)].view(tokens, k, -1).to(_acc(y)) * g.unsqueeze(1).to(_acc(y))).sum(dim=-1)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _block(hidden: int) -> int:
    return min(1024, triton.next_power_of_2(hidden))


if triton is not None:
    @triton.jit
    def _scatter_rows_kernel(x_ptr, pos_ptr, w_ptr, out_ptr, hidden, K: tl.constexpr, WEIGHTED: tl.constexpr,
                             BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + t * hidden + cols, mask=mask)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + j).to(tl.int64)
            if WEIGHTED:
                w = tl.load(w_ptr + t * K + j).to(tl.float32)
                value = (x.to(tl.float32) * w).to(out_ptr.dtype.element_ty)
            else:
                value = x
            tl.store(out_ptr + row * hidden + cols, value, mask=mask)

    @triton.jit
    def _gather_sum_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, hidden, K: tl.constexpr, WEIGHTED: tl.constexpr,
                           BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + j).to(tl.int64)
            y = tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                y = y * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += y
        tl.store(out_ptr + t * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_dot_kernel(y_ptr, pos_ptr, g_ptr, out_ptr, hidden, K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + j).to(tl.int64)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, hidden, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < hidden
                g = tl.load(g_ptr + t * hidden + cols, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
                acc += g * y
            tl.store(out_ptr + t * K + j, tl.sum(acc, axis=0))
