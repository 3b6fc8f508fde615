"""`train.recompute=[layernorm]` for the torch backend's Triton RMSNorm: the norm output is
refilled in place.

megatron-core's TransformerLayer runs each norm under an output-discarding checkpoint
(CheckpointWithoutOutput): the forward runs without autograd, and right before the consumer's
backward it recomputes the norm under autograd into a new tensor, copies that into the freed
storage and backpropagates through the recomputed graph. For `models.kernels.norm.RMSNorm` on
CUDA this checkpoint keeps the forward's own graph (the Triton backward needs x and 1/rms, not
the output) and refills the freed storage with one forward kernel: no copy, no second graph.
With models/mlp_act_recompute.py, `[mlp_act,layernorm]` thus costs one forward kernel per refill
where megatron's path adds a second graph and a copy (timings: bench/results/). Other
functions (MoE's `moe_act`, norms on CPU) take megatron's path. models/transformer_layer.py
wraps the layer's checkpoints in NormOutputCheckpoint.
"""
from __future__ import annotations

import torch

from models.kernels import norm


class NormOutputCheckpoint:
    """Wraps one of megatron's CheckpointWithoutOutput (the layer's own): the norm's output refilled
    in place where that applies, megatron's checkpoint for everything else."""

    def __init__(self, megatron_checkpoint):
        self._megatron = megatron_checkpoint
        self._norm_output: torch.Tensor | None = None

    def checkpoint(self, run_function, *args):
        x = args[0] if args else None
        if (isinstance(run_function, norm.RMSNorm) and norm.triton is not None and len(args) == 1
                and x.is_cuda and x.is_contiguous() and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            # (a strided x would be saved as a contiguous copy: as large as the output freed)
            self._norm_output = run_function(x)
            return self._norm_output
        return self._megatron.checkpoint(run_function, *args)

    def discard_output_and_register_recompute(self, hook_tensor: torch.Tensor) -> None:
        y, self._norm_output = self._norm_output, None
        if y is None:
            return self._megatron.discard_output_and_register_recompute(hook_tensor)
        eps = y.grad_fn.eps
        nbytes = y.untyped_storage().nbytes()
        y.untyped_storage().resize_(0)
        # The hook lives as long as the graph (to the end of backward): holding x or the refilled
        # output past their own backward would keep every layer's alive at once, so it lets go.
        pending = [y]

        def refill(grad: torch.Tensor) -> None:
            out = pending.pop()
            x, weight, _ = out.grad_fn.saved_tensors  # (the Triton norm's own saved x and weight)
            rows = x.view(-1, x.shape[-1])
            out.untyped_storage().resize_(nbytes)
            norm.rms_norm_forward_into(rows, weight, eps, out)

        hook_tensor.register_hook(refill)
