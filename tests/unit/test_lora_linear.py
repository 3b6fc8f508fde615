"""LoRA linears in-process (a world of one): the kernel provider serves them on the targeted slots
only, their output is the base linear's plus scale * x A^T B^T computed here with plain torch, only
the adapters get gradients, dropout acts in training only, and bad lora keys fail validation with
the key named."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from launcher.config.validate import ConfigError, validate
from models import kernel_provider as kp
from models.args import ModelArgs
from models.init import init_weights
from models.lora import LoraOptions, freeze_base, merged
from models.llama import build_llama, transformer_config


@pytest.fixture(scope="module")
def world():
    from parallel.layout import Layout
    from parallel.megatron_engine import init_distributed, shutdown

    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=0)
    yield
    shutdown()


def _model(lora: LoraOptions, dtype: torch.dtype = torch.float32, fp8: bool = False):
    args = ModelArgs.from_config(OmegaConf.load(REPO / "conf/model/tiny.yaml"))
    config = transformer_config(args, tp=1, pp=1, vpp=None, params_dtype=dtype, on_cpu=True, recompute=None)
    model = build_llama(args, config, kp.KernelOptions(lora=lora, fp8=fp8), pre_process=True, post_process=True)
    init_weights(model, seed=3, std=args.init_method_std, num_layers=args.num_layers)
    freeze_base(model)
    return model


def test_provider_serves_lora_linears_to_every_expert(world):
    args = ModelArgs.from_config(OmegaConf.load(REPO / "conf/model/qwen_moe_tiny.yaml"))
    config = transformer_config(args, tp=1, pp=1, vpp=None, params_dtype=torch.float32, on_cpu=True, recompute=None)
    lora = LoraOptions(rank=2, alpha=2, targets=("fc1", "experts"))
    model = build_llama(args, config, kp.KernelOptions(device="cuda", lora=lora), pre_process=True, post_process=True)
    mlp = model.decoder.layers[0].mlp
    assert type(mlp.experts).__name__ == "SequentialMLP"  # (not the grouped GEMM, which reads weights alone)
    assert {type(e.linear_fc1).__name__ for e in mlp.experts.local_experts} == {"LoraColumnParallelLinear"}
    assert {type(e.linear_fc2).__name__ for e in mlp.experts.local_experts} == {"LoraRowParallelLinear"}
    assert type(mlp.shared_experts.linear_fc1).__name__ == "LoraColumnParallelLinear"
    assert type(mlp.shared_experts.linear_fc2).__name__ == "RowParallelLinear"
    assert type(model.decoder.layers[0].self_attention.linear_qkv).__name__ == "ColumnParallelLinear"


def test_provider_serves_lora_linears_on_the_targets_only(world):
    layer = _model(LoraOptions(rank=4, alpha=8, targets=("qkv", "fc2"))).decoder.layers[0]
    names = [type(m).__name__ for m in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
                                        layer.mlp.linear_fc1, layer.mlp.linear_fc2)]
    assert names == ["LoraColumnParallelLinear", "RowParallelLinear",
                     "ColumnParallelLinear", "LoraRowParallelLinear"]
    spec = kp.decoder_block_spec(layer.config, kp.KernelOptions(lora=LoraOptions(rank=4, alpha=8)), None)
    slots = kp.slots(spec, kp.PaddedVocabGPTModel)
    assert slots["linear_qkv"] == slots["linear_fc1"] == "LoraColumnParallelLinear(rank=4)"
    assert slots["linear_proj"] == slots["linear_fc2"] == "LoraRowParallelLinear(rank=4)"


@pytest.mark.parametrize("slot", ["qkv", "proj", "fc1", "fc2"])
def test_output_and_gradients_are_the_low_rank_update(world, slot):
    model = _model(LoraOptions(rank=4, alpha=8))
    layer = model.decoder.layers[1]
    linear = {"qkv": layer.self_attention.linear_qkv, "proj": layer.self_attention.linear_proj,
              "fc1": layer.mlp.linear_fc1, "fc2": layer.mlp.linear_fc2}[slot]
    assert torch.count_nonzero(linear.lora_b) == 0 and torch.count_nonzero(linear.lora_a) > 0
    with torch.no_grad():
        linear.lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 2, linear.weight.shape[1], generator=torch.Generator().manual_seed(2))
    out, _ = linear(x)
    w, a, b = (t.detach().clone().requires_grad_() for t in (linear.weight, linear.lora_a, linear.lora_b))
    expected = x @ w.T + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, x @ merged(w, a, b, 2.0).T, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert linear.weight.grad is None and not linear.weight.requires_grad
    torch.testing.assert_close(linear.lora_a.grad, a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear.lora_b.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slot", ["qkv", "fc2"])
def test_fp8_base_runs_fp8_gemms_beside_the_adapter(world, slot):
    """train.precision=fp8: the frozen base through the fp8 linear's GEMMs (fp8_linear, checked in
    test_fp8_linear.py), plus the adapter in bf16; gradients for the input and the adapters only."""
    from models.kernels.fp8_linear import fp8_linear

    layer = _model(LoraOptions(rank=4, alpha=8), dtype=torch.bfloat16, fp8=True).decoder.layers[0]
    linear = layer.self_attention.linear_qkv if slot == "qkv" else layer.mlp.linear_fc2
    assert type(linear).__name__ == ("LoraFp8ColumnParallelLinear" if slot == "qkv" else "LoraFp8RowParallelLinear")
    with torch.no_grad():
        linear.lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(8, 2, linear.weight.shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()
    x.requires_grad_()
    out, _ = linear(x)
    xr, a, b = (t.detach().clone().requires_grad_() for t in (x, linear.lora_a, linear.lora_b))
    expected = fp8_linear(xr, linear.weight.detach()) + (xr @ a.T) @ b.T * 2.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(out, (x @ linear.weight.T + (x @ a.T) @ b.T * 2.0).detach())  # (not bf16 GEMMs)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    assert linear.weight.grad is None
    for ours, theirs in ((x.grad, xr.grad), (linear.lora_a.grad, a.grad), (linear.lora_b.grad, b.grad)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("slot", ["fc1", "proj"])
def test_base_held_in_fp8_is_dequantised_in_the_gemm(world, slot):
    """lora.base_fp8: after the first forward the weight is one byte a value (e4m3) with a scale per
    output row; the output is x times that weight dequantised (computed here from the original weight:
    rows scaled to a largest magnitude of 448, rounded to e4m3, scaled back) plus the adapter, and so
    are the input and adapter gradients; the weight gets none."""
    layer = _model(LoraOptions(rank=4, alpha=8, base_fp8=True)).decoder.layers[0]
    linear = layer.mlp.linear_fc1 if slot == "fc1" else layer.self_attention.linear_proj
    w = linear.weight.detach().clone()
    with torch.no_grad():
        linear.lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(6, 2, w.shape[1], generator=torch.Generator().manual_seed(2), requires_grad=True)
    out, _ = linear(x)
    assert linear.weight.dtype == torch.float8_e4m3fn and linear.weight.element_size() == 1
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    dequantized = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert (dequantized - w).abs().max() <= w.abs().max() / 8  # (e4m3: 3 mantissa bits)
    assert not torch.equal(dequantized, w)
    xr, a, b = (t.detach().clone().requires_grad_() for t in (x, linear.lora_a, linear.lora_b))
    expected = xr @ dequantized.T + 2.0 * (xr @ a.T) @ b.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    assert linear.weight.grad is None
    for ours, theirs in ((x.grad, xr.grad), (linear.lora_a.grad, a.grad), (linear.lora_b.grad, b.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_only_adapters_require_grad(world):
    model = _model(LoraOptions(rank=2, alpha=2, targets=("proj",)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"decoder.layers.{i}.self_attention.linear_proj.lora_{x}" for i in range(4) for x in "ab"]


def test_dropout_acts_in_training_only(world):
    linear = _model(LoraOptions(rank=4, alpha=8, dropout=0.5, targets=("fc2",))).decoder.layers[0].mlp.linear_fc2
    with torch.no_grad():
        linear.lora_b.fill_(0.1)
    x = torch.randn(3, 1, linear.weight.shape[1])
    linear.eval()
    plain = x @ linear.weight.T + 2.0 * (x @ linear.lora_a.T) @ linear.lora_b.T
    torch.testing.assert_close(linear(x)[0], plain, rtol=1e-6, atol=1e-6)
    linear.train()
    assert not torch.allclose(linear(x)[0], plain)


def _error(*overrides: str) -> ConfigError:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["train.peft=lora", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, "cpu")
    return err.value


@pytest.mark.parametrize("overrides,key,words", [
    (["train.peft=qlora"], "train.peft", "must be one of none, lora"),
    (["lora.rank=0"], "lora.rank", "positive integer"),
    (["lora.alpha=0"], "lora.alpha", "> 0"),
    (["lora.dropout=1.0"], "lora.dropout", "[0, 1)"),
    (["lora.targets=[qkv,gate]"], "lora.targets", "qkv, proj, fc1, fc2, experts"),
    (["lora.targets=[]"], "lora.targets", "non-empty"),
    (["lora.targets=[qkv,experts]"], "lora.targets", "needs a mixture-of-experts model"),
    (["train.compile=true"], "train.compile", "compile"),
    (["lora.base_fp8=true", "train.precision=fp8"], "lora.base_fp8", "train.precision=fp8"),
])
def test_bad_lora_config_names_the_key(overrides, key, words):
    err = _error(*overrides)
    assert err.key == key and words in err.reason, err
