"""models/kernel_provider.py: which class serves each slot of a layer, per run options, and the
model it builds.

- For each case (CPU fp32, GPU bf16, GPU fp8, the in-place recomputes, full recompute, MoE,
  qk-norm, the DeepSpeed engine, tensor parallelism) the table slot -> class is printed and
  checked. The device is an option, so GPU cases are checked on CPU.
- Built models: the modules are the spec's classes, each residual add is linked to the norm that
  reads its sum, and the fp8 linears hold their input where the spec says.
- A tiny Qwen3 (qk-norm) and a tiny Llama built through the provider on CPU give transformers'
  logits for the same weights (HF mapping), an independent reference.
- The GPU RoPE attention's plumbing on CPU: with the kernel's fallback set to megatron's own
  function it computes exactly what megatron's SelfAttention computes (dense and packed rows).
"""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, tiny_hf_model
from models import kernel_provider as kp
from models.args import ModelArgs
from models.init import init_weights
from models.llama import build_llama, transformer_config


@pytest.fixture(scope="module")
def world():
    """A world of one on CPU (gloo, megatron's process groups): megatron's spec builders and
    modules read the pipeline/tensor-parallel state."""
    from parallel.layout import Layout
    from parallel.megatron_engine import init_distributed, shutdown

    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=0)
    yield
    shutdown()


def _args(model: str) -> ModelArgs:
    return ModelArgs.from_config(OmegaConf.load(REPO / f"conf/model/{model}.yaml"))


def _config(args: ModelArgs, recompute=None, tp: int = 1, dtype=torch.bfloat16):
    return transformer_config(args, tp=tp, pp=1, vpp=None, params_dtype=dtype, on_cpu=True, recompute=recompute)


TORCH_CPU = {"layer": "LlamaTransformerLayer", "norm": "RMSNorm", "pre_mlp_norm": "RMSNorm",
             "residual_add": "ResidualAddNorm", "attention": "SelfAttention", "core_attention": "SDPAttention",
             "linear_qkv": "ColumnParallelLinear", "linear_proj": "RowParallelLinear", "mlp": "MLP",
             "linear_fc1": "ColumnParallelLinear", "linear_fc2": "RowParallelLinear",
             "norm_recompute": "CheckpointWithoutOutput", "loss": "PaddedVocabGPTModel", "final_norm": "ChainedRMSNorm"}
GPU = {"attention": "RopeSelfAttention", "mlp": "TritonSwiGLUMLP", "loss": "LinearCrossEntropyGPTModel"}
FP8 = {"linear_qkv": "Fp8ColumnParallelLinear", "linear_proj": "Fp8RowParallelLinear(keep_input)",
       "linear_fc1": "Fp8ColumnParallelLinear", "linear_fc2": "Fp8RowParallelLinear"}
MOE_CPU = {"moe layer": "LlamaTransformerLayer", "moe norm": "RMSNorm", "moe residual_add": "ResidualAddNorm",
           "moe attention": "SelfAttention", "moe core_attention": "SDPAttention", "moe mlp": "MoELayer",
           "moe experts": "GroupedGemmExperts", "moe shared_experts": "SharedExpertMLP"}

CASES = {
    # name: (model, options, recompute, tp, the slots that differ from TORCH_CPU)
    "cpu_fp32": ("tiny", kp.KernelOptions(), None, 1, {}),
    "cuda_bf16": ("tiny", kp.KernelOptions(device="cuda"), None, 1, GPU),
    "cuda_fp8": ("tiny", kp.KernelOptions(device="cuda", fp8=True), None, 1, {**GPU, **FP8}),
    "cuda_recompute_mlp_act_layernorm": (
        "tiny", kp.KernelOptions(device="cuda"), ["mlp_act", "layernorm"], 1,
        {**GPU, "mlp": "TritonActivationRecomputeMLP", "norm_recompute": "NormOutputCheckpoint"}),
    "cuda_fp8_recompute_mlp_act_layernorm": (
        "tiny", kp.KernelOptions(device="cuda", fp8=True), ["mlp_act", "layernorm"], 1,
        {**GPU, **FP8, "mlp": "TritonActivationRecomputeMLP", "norm_recompute": "NormOutputCheckpoint",
         "linear_qkv": "Fp8ColumnParallelLinear(keep_input)", "linear_fc1": "Fp8ColumnParallelLinear(keep_input)",
         "linear_fc2": "Fp8RowParallelLinear(keep_input)"}),
    "cpu_recompute_mlp_act_layernorm": ("tiny", kp.KernelOptions(), ["mlp_act", "layernorm"], 1,
                                        {"mlp": "ActivationRecomputeMLP"}),
    "cuda_recompute_full": ("tiny", kp.KernelOptions(device="cuda"), "full", 1,
                            {**GPU, "residual_add": "get_bias_dropout_add", "final_norm": "RMSNorm"}),
    "cuda_tp2": ("tiny", kp.KernelOptions(device="cuda"), None, 2, {**GPU, "loss": "PaddedVocabGPTModel"}),
    # a preference loss weighs each sequence's tokens differently: the fused loss's per-token form
    "cuda_dpo": ("tiny", kp.KernelOptions(device="cuda", objective="dpo"), None, 1,
                 {**GPU, "loss": "LinearTokenLossGPTModel"}),
    "cuda_deepspeed": ("tiny", kp.KernelOptions(device="cuda", engine="deepspeed"), None, 1, {}),
    "cpu_qk_layernorm": ("qwen3_30b_a3b", kp.KernelOptions(), None, 1,
                         {**MOE_CPU, "moe q_norm": "RMSNorm"}),
    "cpu_moe_shared_experts": ("qwen_moe_tiny", kp.KernelOptions(), None, 1, MOE_CPU),
    "cuda_moe_shared_experts": ("qwen_moe_tiny", kp.KernelOptions(device="cuda", moe_dispatch="megatron"), ["layernorm"], 1,
                                {**MOE_CPU, "moe attention": "RopeSelfAttention", "loss": "LinearCrossEntropyGPTModel",
                                 "moe shared_experts": "TritonSwiGLUSharedExpertMLP",
                                 "moe norm_recompute": "NormOutputCheckpoint"}),
    "cuda_moe_fused_dispatch": ("qwen3_30b_a3b", kp.KernelOptions(device="cuda", moe_dispatch="fused"), None, 1,
                                {**MOE_CPU, "moe attention": "RopeSelfAttention", "moe q_norm": "RMSNorm",
                                 "moe mlp": "FusedMoELayer", "moe shared_experts": "TritonSwiGLUSharedExpertMLP",
                                 "loss": "LinearCrossEntropyGPTModel"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_slot_table(world, case):
    model, options, recompute, tp, expected = CASES[case]
    config = _config(_args(model), recompute, tp)
    table = kp.slots(kp.decoder_block_spec(config, options, None), kp.model_class(config, options))
    print(f"\n{case} ({options}, recompute={recompute}, tp={tp}):")
    for slot, name in table.items():
        print(f"  {slot:24} {name}")
    dense = not model.startswith(("qwen3_30b", "qwen_moe"))
    want = {**(TORCH_CPU if dense else {"loss": "PaddedVocabGPTModel", "final_norm": "ChainedRMSNorm"}), **expected}
    assert {slot: table.get(slot) for slot in want} == want


def test_qk_layernorm_dense(world):
    args = dataclasses.replace(_args("tiny"), qk_layernorm=True)
    table = kp.slots(kp.decoder_block_spec(_config(args), kp.KernelOptions(device="cuda"), None), kp.GPTModel)
    assert table["q_norm"] == "RMSNorm" and table["attention"] == "RopeSelfAttention"


@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_context_parallel_core_attention(world, mode):
    """cp > 1: the core-attention slot is the CP attention in the run's mode; nothing else changes."""
    args = _args("tiny")
    config = transformer_config(args, tp=1, pp=1, vpp=None, params_dtype=torch.float32, on_cpu=True, recompute=None,
                                cp=2)
    for options, differ in ((kp.KernelOptions(cp_mode=mode), {}), (kp.KernelOptions(device="cuda", cp_mode=mode), GPU)):
        table = kp.slots(kp.decoder_block_spec(config, options, None), kp.model_class(config, options))
        assert table == {**TORCH_CPU, **differ, "q_norm": "IdentityOp",
                         "core_attention": f"ContextParallelAttention({mode})"}


def test_backend_without_transformer_engine(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError
    assert not kp.transformer_engine_available()
    assert kp.default_backend() == "torch"


def test_bad_options_name_the_option():
    for kw, word in ((dict(device="tpu"), "device"), (dict(backend="jax"), "backend"), (dict(engine="x"), "engine"),
                     (dict(cp_mode="ulysses"), "context-parallel")):
        with pytest.raises(ValueError, match=word):
            kp.KernelOptions(**kw)


def _build(args: ModelArgs, options: kp.KernelOptions, recompute=None, dtype=torch.float32):
    return build_llama(args, _config(args, recompute, dtype=dtype), options, pre_process=True, post_process=True)


def test_built_model_links_each_residual_add_to_its_reader(world):
    from models.residual_norm import ResidualAddNorm

    model = _build(_args("tiny"), kp.KernelOptions(device="cuda"))
    layers = list(model.decoder.layers)
    readers = [layer.input_layernorm for layer in layers[1:]] + [model.decoder.final_layernorm]
    for layer, reader in zip(layers, readers):
        assert isinstance(layer.self_attn_bda, ResidualAddNorm) and isinstance(layer.mlp_bda, ResidualAddNorm)
        assert layer.self_attn_bda.consumer is layer.pre_mlp_layernorm
        assert layer.mlp_bda.consumer is reader
    assert type(model).__name__ == "LinearCrossEntropyGPTModel"
    assert type(layers[0].self_attention).__name__ == "RopeSelfAttention"
    assert type(layers[0].mlp).__name__ == "TritonSwiGLUMLP"


def test_built_fp8_linears_hold_their_input_where_the_spec_says(world):
    model = _build(_args("tiny"), kp.KernelOptions(device="cuda", fp8=True), ["mlp_act", "layernorm"],
                   dtype=torch.bfloat16)
    layer = model.decoder.layers[0]
    linears = (layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1,
               layer.mlp.linear_fc2)
    assert [type(m).__name__ for m in linears] == ["Fp8ColumnParallelLinear", "Fp8RowParallelLinear"] * 2
    assert [m.keep_input for m in linears] == [True] * 4
    assert [m.keep_input for m in _fp8_linears(_build(_args("tiny"), kp.KernelOptions(device="cuda", fp8=True),
                                                      dtype=torch.bfloat16))] == [False, True, False, False]
    assert layer._norm_checkpoint is not None  # (the in-place norm recompute's wrapper)


def _fp8_linears(model):
    layer = model.decoder.layers[0]
    return (layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1,
            layer.mlp.linear_fc2)


def test_built_moe_model_has_the_spec_classes(world):
    model = _build(_args("qwen_moe_tiny"), kp.KernelOptions(device="cuda", moe_dispatch="fused"))
    moe = next(layer.mlp for layer in model.decoder.layers if hasattr(layer.mlp, "experts"))
    assert type(moe).__name__ == "FusedMoELayer"
    assert type(moe.experts).__name__ == "GroupedGemmExperts"
    assert type(moe.shared_experts).__name__ == "TritonSwiGLUSharedExpertMLP"
    assert moe.shared_experts.use_shared_expert_gate == _args("qwen_moe_tiny").moe_shared_expert_gate


HF_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                initializer_range=0.15, max_position_embeddings=512, tie_word_embeddings=False)


@pytest.mark.parametrize("family,config_cls,extra", [
    ("llama", "LlamaConfig", dict(vocab_size=384, rms_norm_eps=1e-5)),
    ("qwen3", "Qwen3Config", dict(vocab_size=300, head_dim=32)),
])
def test_cpu_model_gives_transformers_logits(world, family, config_cls, extra):
    from models import hf_mapping as hfm

    hf = tiny_hf_model(family, config_cls, **HF_SHAPE, **extra)
    hf_config = hf.config.to_dict()
    hf_config["architectures"] = [type(hf).__name__]
    args = hfm.args_from_hf_config(hf_config, family)
    model = _build(args, kp.KernelOptions())
    tensors = dict(hf.state_dict())
    state = dict(hfm.hf_to_shardforge(tensors.__getitem__, args))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")], (missing, unexpected)
    model.eval()
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., :args.vocab_size]
        want = hf(tokens).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_rope_attention_computes_what_megatron_attention_does(world, monkeypatch):
    """RopeSelfAttention on CPU with the kernels' fallback set to megatron's unfused function:
    output and gradients equal megatron's SelfAttention's, for dense rows (the fused-qkv path's
    split fallback) and packed rows (THD)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.attention import SelfAttention

    from models.kernels import rope
    from models.rope_attention import RopeSelfAttention

    monkeypatch.setattr(rope, "compiled_rope_bshd", rope.unfused_rope_bshd)  # (no inductor on the CPU test)
    args = _args("tiny")
    model = _build(args, kp.KernelOptions(device="cuda"))
    init_weights(model, seed=0, std=args.init_method_std, num_layers=args.num_layers)
    attention = model.decoder.layers[1].self_attention
    assert type(attention) is RopeSelfAttention
    s = 32
    freqs = model.rotary_pos_emb(s)  # (packed: rows restart at each document, megatron's case 2)
    hidden = torch.randn(s, 2, args.hidden_size, generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 11, 12, 32], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=20, max_seqlen_kv=20)
    for x, params, f in ((hidden, None, freqs), (hidden[:, :1], packed, freqs[:20])):
        results = []
        for cls in (RopeSelfAttention, SelfAttention):
            attention.__class__ = cls  # the same module, megatron's forward
            h = x.clone().requires_grad_()
            out, _ = attention(h, attention_mask=None, rotary_pos_emb=f, packed_seq_params=params)
            grads = torch.autograd.grad(out, [h, attention.linear_qkv.weight], torch.ones_like(out))
            results.append((out, *grads))
        attention.__class__ = RopeSelfAttention
        for got, want in zip(*results):
            assert torch.equal(got, want)
        assert results[0][0].abs().max() > 0
