"""models/fused_moe.py and models/kernels/moe_permute.py on CPU, against megatron-core's own code.

- The permute reproduces megatron's permuted rows exactly (same order) and the combine its
  unpermute with the probabilities, in fp64; both Functions pass gradcheck.
- FusedMoELayer (router, permute, grouped GEMMs with device offsets, combine) against megatron's
  MoELayer forward on the same module (qwen_moe_tiny: gated shared expert, softmax before top-k,
  aux loss), fp32: output and every gradient, router and shared expert included; an expert that
  receives no token gets exactly zero gradient. On CPU the grouped path is forced (torch's
  _grouped_mm runs there); on the GPU gpu_tests/test_fused_moe.py compares in bf16.
"""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import permute, topk_routing_with_score_function, unpermute
from omegaconf import OmegaConf

from conftest import REPO
from models import kernel_provider as kp
from models.args import ModelArgs
from models.fused_moe import FusedMoELayer
from models.init import init_weights
from models.kernels import moe_permute
from models.kernels.grouped_experts import GroupedGemmExperts
from models.llama import build_llama, transformer_config


@pytest.fixture(scope="module")
def world():
    from parallel.layout import Layout
    from parallel.megatron_engine import init_distributed, shutdown

    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=0)
    yield
    shutdown()


def _routing(tokens: int, experts: int, k: int, seed: int):
    logits = torch.randn(tokens, experts, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    probs, routing_map = topk_routing_with_score_function(logits, k)
    return probs, routing_map, moe_permute.Routing.from_map(probs, routing_map, k)


def test_permute_and_combine_match_megatron_exactly():
    tokens, experts, k, hidden = 37, 8, 2, 16
    probs, routing_map, routing = _routing(tokens, experts, k, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=g)
    y = torch.randn(tokens * k, hidden, dtype=torch.float64, generator=g)
    want, _, sorted_indices = permute(x, routing_map, num_out_tokens=tokens * k)
    assert torch.equal(moe_permute.permute(x, routing), want)
    assert torch.equal(routing.tokens_per_expert, routing_map.sum(dim=0))
    combined = unpermute(y, sorted_indices, x.shape, probs=probs, routing_map=routing_map)
    torch.testing.assert_close(moe_permute.combine(y, routing), combined, rtol=1e-12, atol=1e-12)


def test_permute_and_combine_gradients():
    tokens, experts, k, hidden = 11, 6, 3, 5
    _, _, routing = _routing(tokens, experts, k, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(tokens * k, hidden, dtype=torch.float64, generator=g, requires_grad=True)
    w = routing.weights.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: moe_permute._Permute.apply(x, routing.pos), (x,))
    assert torch.autograd.gradcheck(lambda y, w: moe_permute._Combine.apply(y, w, routing.pos), (y, w))


def test_fused_layer_matches_megatron_moe_layer(world, monkeypatch):
    monkeypatch.setattr(GroupedGemmExperts, "_grouped_path", lambda self, hidden: True)  # torch's CPU _grouped_mm
    args = ModelArgs.from_config(OmegaConf.load(REPO / "conf/model/qwen_moe_tiny.yaml"))
    config = transformer_config(args, tp=1, pp=1, vpp=None, params_dtype=torch.float32, on_cpu=True, recompute=None)
    model = build_llama(args, config, kp.KernelOptions(device="cuda", moe_dispatch="fused"), pre_process=True, post_process=True)
    init_weights(model, seed=0, std=args.init_method_std, num_layers=args.num_layers)
    model.train()
    layer = model.decoder.layers[0].mlp
    assert isinstance(layer, FusedMoELayer) and layer.fused_path(torch.empty(0))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # expert 7's logit is below every other's for positive inputs: it gets no token
        layer.router.weight.copy_(torch.rand(layer.router.weight.shape, generator=g))
        layer.router.weight[7] *= -1
    hidden = torch.rand(24, 2, args.hidden_size, generator=g)
    grad_out = torch.randn(hidden.shape, generator=g)
    params = [p for p in layer.parameters()]
    results = []
    for forward in (FusedMoELayer.forward, MoELayer.forward):
        for p in params:
            p.grad = None
        x = hidden.clone().requires_grad_()
        out, bias = forward(layer, x)
        assert bias is None
        out.backward(grad_out)
        results.append((out.detach(), x.grad, [p.grad.clone() for p in params]))
    (out, x_grad, grads), (ref, ref_x_grad, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-6)
    names = [n for n, _ in layer.named_parameters()]
    assert any("router" in n for n in names) and any("shared_experts" in n for n in names)
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    idle = [got for name, got in zip(names, grads) if "local_experts.7." in name]
    assert len(idle) == 2 and all(torch.count_nonzero(t) == 0 for t in idle)
