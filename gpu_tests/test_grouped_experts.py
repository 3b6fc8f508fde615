"""GroupedGemmExperts (torch._grouped_mm) against megatron's SequentialMLP loop on the same
expert weights, on the GPU: outputs, input and weight gradients, bf16 tolerance 1e-2 relative
to the norm. Includes an expert that receives no token."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from models.kernels.grouped_experts import GroupedGemmExperts, grouped_mm_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not grouped_mm_available(torch.device("cuda")),
                                reason="needs a Hopper GPU (run on the GPU machine)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_grouped_experts_match_sequential_loop(build_engine):
    # The reference loop's linears must return their weight gradients to autograd.grad: the engine
    # is built without gradient accumulation fusion, which would add them into DDP's main_grad.
    args, engine = build_engine("mixtral_tiny", seed=5, seq_length=64, micro_batch_size=1,
                                params_dtype=torch.bfloat16)
    device = torch.device("cuda")
    experts = engine.chunks[0].module.module.decoder.layers[0].mlp.experts
    assert isinstance(experts, GroupedGemmExperts)
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.tensor([300, 0, 17, 128, 1, 250, 64, 200])  # one expert gets nothing
    hidden = torch.randn(int(counts.sum()), args.hidden_size, device=device, dtype=torch.bfloat16, generator=g)
    probs = torch.rand(int(counts.sum()), device=device, generator=g)
    weights = [p for p in experts.parameters()]
    results = []
    for forward in (GroupedGemmExperts.forward, SequentialMLP.forward):
        x = hidden.clone().requires_grad_()
        out, _ = forward(experts, x, counts, probs)
        grad_out = torch.ones_like(out) / out.numel() ** 0.5
        grads = torch.autograd.grad(out, [x, *weights], grad_out)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert _rel(out, ref) < 1e-2, f"output: {_rel(out, ref):.3g}"
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b.abs().max() == 0:  # the expert without tokens: its weight gradient must be exactly zero
            assert a.abs().max() == 0, f"gradient {i}: expert without tokens got a nonzero gradient"
        else:
            assert _rel(a, b) < 1e-2, f"gradient {i}: {_rel(a, b):.3g}"
