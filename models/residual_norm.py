"""The residual add fused into the RMSNorm that reads its sum (torch backend, CUDA).

In megatron-core's TransformerLayer every residual add (`self_attn_bda`, `mlp_bda`) is followed
by an RMSNorm of its sum: the layer's pre-MLP norm, or the next layer's input norm (the final
norm after the last layer). Unfused that is an add kernel (read two, write one), a norm kernel
that reads the sum back, and in the backward an add of the sum's two gradients. Here the add
writes the sum and the norm output in one Triton pass, and the norm's backward adds the sum's
own gradient in the same pass (models/kernels/norm.py `_TritonAddRMSNorm`).

`fuse_residual_norms` swaps each layer's bias-dropout-add for a ResidualAddNorm that knows which
norm reads its sum; that norm then returns the output computed with the add instead of
normalizing again. Anything the fused pass does not cover (a bias, dropout, CPU, torch.compile,
other dtypes) goes through megatron's own bias-dropout-add and norm unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_block import TransformerBlock

from models.kernels import norm


class ResidualAddNorm:
    """A TransformerLayer `*_bda` (called as bda(training, fused)(x_with_bias, residual, prob))
    that, where it can, also computes `consumer`'s output of the sum."""

    def __init__(self, consumer: norm.RMSNorm):
        self.consumer = consumer

    def __call__(self, training: bool, fused: bool) -> Callable:
        unfused = get_bias_dropout_add(training, fused)

        def bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            x, bias = x_with_bias
            if bias is None and (prob == 0 or not training) and _fused_applies(x, residual):
                total, out = norm._TritonAddRMSNorm.apply(x, residual, self.consumer.weight, self.consumer.eps)
                self.consumer.precomputed = (total, out)
                return total
            return unfused(x_with_bias, residual, prob)

        return bias_dropout_add


def _fused_applies(x: torch.Tensor, residual: torch.Tensor) -> bool:
    return (norm.triton is not None and x.is_cuda and x.dtype == residual.dtype and x.shape == residual.shape
            and not torch.compiler.is_compiling())


def fuse_residual_norms(decoder: TransformerBlock) -> None:
    """Link each layer's residual adds to the norm that reads their sum: its pre-MLP norm, then
    the next layer's input norm (the block's final norm after its last layer). Layers whose norms
    are not models.kernels' RMSNorm, and full-layer recompute (which re-runs one layer alone, so a
    sum would wait for a norm that does not run), keep megatron's adds."""
    if decoder.config.recompute_granularity == "full":
        return
    layers = list(decoder.layers)
    readers = [layer.input_layernorm for layer in layers[1:]] + [getattr(decoder, "final_layernorm", None)]
    for layer, next_norm in zip(layers, readers):
        if isinstance(layer.pre_mlp_layernorm, norm.RMSNorm):
            layer.self_attn_bda = ResidualAddNorm(layer.pre_mlp_layernorm)
        if isinstance(next_norm, norm.RMSNorm):
            layer.mlp_bda = ResidualAddNorm(next_norm)
