"""FusedMoELayer (models/fused_moe.py) against megatron's MoELayer forward on the same module, on
the GPU in bf16: output, input and every parameter gradient within 1e-2 relative to the norm, an
expert without tokens exactly zero; and the fused forward + backward make no host synchronization
(torch's sync debug mode raises on one)."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from models.fused_moe import FusedMoELayer
from models.kernels.grouped_experts import grouped_mm_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not grouped_mm_available(torch.device("cuda")),
                                reason="needs a Hopper GPU (run on the GPU machine)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _layer(build_engine):
    args, engine = build_engine("qwen_moe_tiny", seed=5, seq_length=64, micro_batch_size=1,
                                params_dtype=torch.bfloat16, moe_dispatch="fused")
    layer = engine.chunks[0].module.module.decoder.layers[0].mlp
    assert isinstance(layer, FusedMoELayer)
    return args, layer


def test_fused_moe_layer_matches_megatron(build_engine):
    args, layer = _layer(build_engine)
    layer.train()
    assert layer.fused_path(torch.empty(0, device="cuda", dtype=torch.bfloat16))
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():  # expert 7's logit is below every other's for positive inputs: it gets no token
        layer.router.weight.copy_(torch.rand(layer.router.weight.shape, device="cuda", generator=g))
        layer.router.weight[7] *= -1
    hidden = torch.rand(512, 2, args.hidden_size, device="cuda", generator=g).bfloat16()
    grad_out = torch.randn(hidden.shape, device="cuda", generator=g).bfloat16()
    names, params = zip(*layer.named_parameters())
    results = []
    for forward in (FusedMoELayer.forward, MoELayer.forward):
        x = hidden.clone().requires_grad_()
        out, _ = forward(layer, x)
        grads = torch.autograd.grad(out, [x, *params], grad_out)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert _rel(out, ref) < 1e-2, _rel(out, ref)
    for name, a, b in zip(("input", *names), grads, ref_grads):
        if "local_experts.7." in name:
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0, name
        else:
            assert _rel(a, b) < 1e-2, (name, _rel(a, b))


def test_fused_moe_layer_makes_no_host_sync(build_engine):
    args, layer = _layer(build_engine)
    layer.train()
    x = torch.randn(256, 2, args.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = layer(x)  # first call: kernels compiled, caches filled
    out.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = layer(x)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
