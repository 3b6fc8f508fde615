"""The residual add fused into the RMSNorm that reads its sum (torch backend, CUDA).

In megatron-core's TransformerLayer every residual add (`self_attn_bda`, `mlp_bda`) is followed
by an RMSNorm of its sum: the layer's pre-MLP norm, or the next layer's input norm (the final
norm after the last layer). Unfused that is an add kernel (read two, write one), a norm kernel
that reads the sum back, and in the backward an add of the sum's two gradients. Here the add
writes the sum and the norm output in one Triton pass, and the norm's backward adds the sum's
own gradient in the same pass (models/kernels/norm.py `_TritonAddRMSNorm`).

The layer spec names ResidualAddNorm as each layer's bias-dropout-add and gives the layers of
one model chunk a shared NormChain: the norms in the order they read the residual stream (a
layer's input norm, its pre-MLP norm, ..., the block's final norm). An add's sum is read by the
next norm in the chain, which then returns the output computed with the add instead of
normalizing again. Anything the fused pass does not cover (a bias, dropout, CPU, torch.compile,
other dtypes) goes through megatron's own bias-dropout-add and norm unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_layer import TransformerLayer

from models.kernels import norm


class NormChain:
    """Built with one model chunk: links each residual add to the norm that reads its sum, in the
    order the layers and the final norm are built (a layer's last add waits for the next norm)."""

    def __init__(self):
        self._waiting: ResidualAddNorm | None = None

    def add_layer(self, layer: TransformerLayer) -> None:
        self.read_by(layer.input_layernorm)
        if isinstance(layer.self_attn_bda, ResidualAddNorm) and isinstance(layer.pre_mlp_layernorm, norm.RMSNorm):
            layer.self_attn_bda.consumer = layer.pre_mlp_layernorm
        if isinstance(layer.mlp_bda, ResidualAddNorm):
            self._waiting = layer.mlp_bda

    def read_by(self, module: torch.nn.Module) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and isinstance(module, norm.RMSNorm):
            waiting.consumer = module


class ChainedRMSNorm(norm.RMSNorm):
    """The block's final norm: it reads the last layer's residual sum."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, norm_chain: NormChain, **kwargs):
        super().__init__(config, hidden_size, eps, **kwargs)
        norm_chain.read_by(self)


class ResidualAddNorm:
    """A TransformerLayer `*_bda` (called as bda(training, fused)(x_with_bias, residual, prob))
    that, where it can, also computes `consumer`'s output of the sum (NormChain sets it)."""

    consumer: norm.RMSNorm | None = None

    def __call__(self, training: bool, fused: bool) -> Callable:
        unfused = get_bias_dropout_add(training, fused)
        consumer = self.consumer
        if consumer is None:
            return unfused

        def bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            x, bias = x_with_bias
            if bias is None and (prob == 0 or not training) and _fused_applies(x, residual):
                total, out = norm._TritonAddRMSNorm.apply(x, residual, consumer.weight, consumer.eps)
                consumer.precomputed = (total, out)
                return total
            return unfused(x_with_bias, residual, prob)

        return bias_dropout_add


def _fused_applies(x: torch.Tensor, residual: torch.Tensor) -> bool:
    return (norm.triton is not None and x.is_cuda and x.dtype == residual.dtype and x.shape == residual.shape
            and not torch.compiler.is_compiling())
