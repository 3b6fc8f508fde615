"""Fused output layer + cross entropy: the [tokens, vocab] logits never exist whole.

The unfused path materializes the logits (bf16), then cross entropy makes fp32 copies of them
for the max, the exponentials, the softmax gradient... — several passes over tokens × vocab
(8192 × 128256 for llama3_1b at seq 4096, micro batch 2). Here,
chunk by chunk of tokens, the forward computes the logits, the loss and already the gradients
of hidden states and weight (softmax − one-hot, one compiled kernel on GPU), and keeps only
those; the backward scales them.

Contract (what ShardForge's loss function does): the training loss is c · Σ_t mask_t · loss_t
with a 0/1 mask and one scalar c, so the gradient arriving at the per-token losses is c · mask.
The mask is applied in the forward; the backward recovers c.
"""
from __future__ import annotations

import torch

from models.kernels.deferred_compile import deferred_compile


def _loss_and_logit_grad(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Per-token loss (fp32) and d(Σ mask·loss)/d logits in the logits' dtype.

    The one-hot is a comparison, not a scatter: compiled, this is one reduction (logsumexp) and
    one pointwise pass that writes the bf16 gradient, with no fp32 copy of the chunk in memory
    (a scatter_add made inductor materialize one: 0.5 GB at 4096 tokens × 32k vocab)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = (lse - x.gather(-1, labels.unsqueeze(-1))).squeeze(-1)
    one_hot = torch.arange(x.size(-1), device=x.device) == labels.unsqueeze(-1)
    grad = (torch.exp(x - lse) - one_hot.to(x.dtype)) * mask.unsqueeze(-1)  # softmax - one-hot
    return loss, grad.to(logits.dtype)


_compiled = deferred_compile(_loss_and_logit_grad, dynamic=True)


def _scale(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (grad * scale).to(dtype)


_compiled_scale = deferred_compile(_scale)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        loss_and_grad = _compiled if hidden.is_cuda else _loss_and_logit_grad
        mask = mask.to(torch.float32)
        losses = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        for start in range(0, hidden.size(0), chunk_tokens):
            end = min(start + chunk_tokens, hidden.size(0))
            h = hidden[start:end]
            loss, grad_logits = loss_and_grad(h @ weight.t(), labels[start:end], mask[start:end])
            losses[start:end] = loss
            grad_hidden[start:end] = grad_logits @ weight
            if not hidden.is_cuda:  # (no CPU kernel for addmm with out_dtype)
                product = (grad_logits.t() @ h).float()
                grad_weight = product if grad_weight is None else grad_weight.add_(product)
            elif grad_weight is None:  # the first chunk writes the fp32 gradient: no zero-filled [V, h] first
                grad_weight = torch.mm(grad_logits.t(), h, out_dtype=torch.float32)
            else:  # accumulate in the GEMM's fp32 epilogue: no bf16 [V, h] product to add
                torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=torch.float32, out=grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight, mask)
        ctx.weight_dtype = weight.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        grad_hidden, grad_weight, mask = ctx.saved_tensors
        scale = (grad_losses.float() * mask).sum() / mask.sum().clamp(min=1)  # c, from grad = c · mask
        # scaled and rounded to the weight's dtype in one pass over the fp32 [V, h] gradient (torch's
        # mixed-dtype mul with out= takes its unvectorized loop, well short of the memory rate)
        grad_weight = (_compiled_scale if grad_weight.is_cuda else _scale)(grad_weight, scale, ctx.weight_dtype)
        return grad_hidden * scale.to(grad_hidden.dtype), grad_weight, None, None, None


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    return (torch.logsumexp(x, dim=-1) - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1))


_compiled_token_loss = deferred_compile(_token_loss, dynamic=True)


class LinearTokenLosses(torch.autograd.Function):
    """Per-token cross entropy of hidden @ weightᵀ for a loss that weighs each token's term its own
    way (the preference objectives: every sequence by its pair's term). The forward keeps no
    logits; the backward recomputes each chunk's logits and applies that chunk's upstream gradients
    (one more output-layer GEMM than LinearCrossEntropy, whose backward has a single scale)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        token_loss = _compiled_token_loss if hidden.is_cuda else _token_loss
        losses = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_tokens):
            end = min(start + chunk_tokens, hidden.size(0))
            losses[start:end] = token_loss(hidden[start:end] @ weight.t(), labels[start:end])
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, labels = ctx.saved_tensors
        loss_and_grad = _compiled if hidden.is_cuda else _loss_and_logit_grad
        grad_losses = grad_losses.float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.size(0), ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, hidden.size(0))
            h = hidden[start:end]
            # d(Σ g·loss)/d logits = g · (softmax − one-hot): the upstream gradient in the mask's place
            _, grad_logits = loss_and_grad(h @ weight.t(), labels[start:end], grad_losses[start:end])
            grad_hidden[start:end] = grad_logits @ weight
            if hidden.is_cuda:  # accumulate in the GEMM's fp32 epilogue
                torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=torch.float32, out=grad_weight)
            else:
                grad_weight.add_((grad_logits.t() @ h).float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None


# Tokens per chunk. Each chunk adds its weight gradient into the fp32 [V, h] accumulator: a read and a
# write of 8·V·h bytes against that GEMM's 2·chunk·V·h FLOPs, i.e. chunk/4 FLOPs per byte whatever
# the vocabulary. Below about a thousand tokens (a GPU's FLOP rate over its memory rate) that
# round trip, not the GEMM, sets the pace; 2048 keeps it GEMM-bound. The price is the chunk's bf16
# logits and their gradient, live at the forward's end: 2 · 2048 · V · 2 bytes (1.2 GB at a 152k
# vocabulary).
CHUNK_TOKENS = 2048


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """hidden [..., h] @ weight[V, h]ᵀ → per-token cross entropy [...] against labels, for a loss
    of the form c · Σ mask · loss (see the module docstring)."""
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    shape = labels.shape
    losses = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1),
                                      mask.reshape(-1), chunk_tokens)
    return losses.reshape(shape)


def linear_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int | None = None) -> torch.Tensor:
    """hidden [..., h] @ weight[V, h]ᵀ → per-token cross entropy [...] against labels, for any loss
    of them (LinearTokenLosses)."""
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    losses = LinearTokenLosses.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), chunk_tokens)
    return losses.reshape(labels.shape)
