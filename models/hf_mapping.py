"""Hugging Face ⇄ ShardForge: config fields, tensor names and tensor layouts of Llama-family models.

Supported architectures: Llama (2/3, incl. Llama-3.1 "llama3" RoPE scaling), Mistral, Qwen2/2.5
(q/k/v bias) and Qwen3 (per-head RMSNorm on q and k). All are the same decoder: RMSNorm, RoPE
(rotate-half), GQA attention, SwiGLU MLP, no other biases. Their mixture-of-experts versions
(Mixtral, Qwen2-MoE, Qwen3-MoE) share it; models.hf_moe_mapping maps their MoE MLPs.

Layouts (ShardForge = megatron-core GPTModel at tp=1/pp=1):
- `linear_qkv` fuses q/k/v, interleaved per query group g:
  [q heads of g (heads_per_group * head_dim rows), k_g (head_dim rows), v_g (head_dim rows)].
  Megatron's TP split of linear_qkv then gives every rank whole groups.
- `linear_fc1` = cat([gate_proj, up_proj], dim 0) (megatron's SwiGLU takes chunk(2) of the output).
- The vocabulary is padded to a multiple of 128 (models.args.padded_vocab_size) so every TP size
  builds the same model. Import pads embedding/output rows with zeros; export cuts them off. The
  padded ids are no tokens: the loss leaves their logits out of the softmax (models/padded_vocab.py),
  generation never samples them (launcher.generate), training never sees them as labels.

Two name spaces on our side: module state_dict names (decoder.layers.3.pre_mlp_layernorm.weight,
used by import, which fills a built model) and dist-checkpoint keys (stacked over layers, with the
norms under TransformerEngine's names, e.g. decoder.layers.mlp.linear_fc1.layer_norm_weight of
shape [num_layers, hidden], used by export, which reads checkpoints).

This module imports no framework beyond torch: it is pure mapping, testable on its own.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable, Mapping

import torch

from models.args import ModelArgs
from models.hf_error import HFMappingError
from models.hf_moe_mapping import (default_moe_architecture, moe_checkpoint_suffixes, moe_fields_from_hf, moe_hf_config,
                                   moe_layer_hf_names, moe_layer_to_shardforge, moe_to_hf)

# HF architecture -> the model_type transformers writes beside it.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_QKV_BIAS = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")   # q/k/v bias by definition (no o_proj bias)
_QK_NORM_ARCHS = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# Megatron's llama3 RoPE scaling hard-codes these (rotary_pos_embedding._apply_scaling).
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelArgs


def architecture_of(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else f"model_type={config.get('model_type')!r}"
    if arch not in ARCHITECTURES:
        raise HFMappingError(f"unsupported HF architecture {arch}; supported: {', '.join(ARCHITECTURES)}")
    return arch


def _rope(config: Mapping[str, Any]) -> tuple[float, bool, float]:
    """(rope_theta, llama3 scaling on?, factor) from transformers 4.x (rope_theta + rope_scaling)
    or 5.x (rope_parameters) config.json."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), False, 8.0
    if rope_type != "llama3":
        raise HFMappingError(f"config.json: rope type {rope_type!r} is not supported (default | llama3)")
    spec = {**scaling, **params}
    for key, value in _LLAMA3_ROPE_FIXED.items():
        if key in spec and float(spec[key]) != value:
            raise HFMappingError(f"config.json: llama3 rope scaling with {key}={spec[key]} is not supported "
                                 f"(megatron-core fixes it to {value:g})")
    return float(theta), True, float(spec["factor"])


def args_from_hf_config(config: Mapping[str, Any], name: str) -> ModelArgs:
    """ModelArgs of an HF config.json (dict). Raises HFMappingError for anything we would get wrong."""
    arch = architecture_of(config)
    if config.get("hidden_act", "silu") != "silu":
        raise HFMappingError(f"config.json: hidden_act={config['hidden_act']!r} (only silu/SwiGLU is supported)")
    if config.get("mlp_bias"):
        raise HFMappingError("config.json: mlp_bias=true is not supported")
    # Llama/Qwen3 `attention_bias` also puts a bias on o_proj, which our model lacks; Qwen2 has
    # q/k/v bias (and no o bias) by definition.
    if arch not in _QKV_BIAS and config.get("attention_bias"):
        raise HFMappingError(f"config.json: attention_bias=true ({arch}: bias on o_proj too) is not supported")
    if config.get("use_sliding_window"):
        raise HFMappingError("config.json: use_sliding_window=true is not supported")
    theta, scaling, factor = _rope(config)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = config.get("head_dim") or hidden // heads
    moe: dict[str, Any] = {}
    if _is_moe_architecture(arch):
        moe = moe_fields_from_hf(config, arch)
    return ModelArgs(
        name=name,
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
        # None keeps megatron's hidden/heads default (and conf/model's `kv_channels: null` style).
        kv_channels=int(head_dim) if head_dim * heads != hidden else None,
        rotary_base=theta,
        rope_scaling=scaling,
        rope_scaling_factor=factor,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        add_qkv_bias=arch in _QKV_BIAS and bool(config.get("qkv_bias", True)),
        qk_layernorm=arch in _QK_NORM_ARCHS,
        **moe,
    )


def default_architecture(args: ModelArgs) -> str:
    """The HF class that computes exactly what a ShardForge model of this shape computes."""
    if args.qk_layernorm and args.add_qkv_bias:
        raise HFMappingError("no supported HF architecture has both qk-norm and qkv bias")
    if args.is_moe:
        return default_moe_architecture(args)
    if args.qk_layernorm:
        return "Qwen3ForCausalLM"
    if args.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def hf_config_from_args(args: ModelArgs, architecture: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json for `args`; `base` (e.g. the imported model's own config.json) keeps fields we do
    not model (token ids, dtype, ...), but every shape field is rewritten from `args`."""
    if architecture not in ARCHITECTURES:
        raise HFMappingError(f"unsupported HF architecture {architecture}; supported: {', '.join(ARCHITECTURES)}")
    needs_bias, needs_qk_norm = architecture in _QKV_BIAS, architecture in _QK_NORM_ARCHS
    if args.add_qkv_bias != needs_bias or args.qk_layernorm != needs_qk_norm:
        raise HFMappingError(f"{architecture} cannot hold a model with add_qkv_bias={args.add_qkv_bias} "
                             f"qk_layernorm={args.qk_layernorm}")
    if args.is_moe != _is_moe_architecture(architecture):
        raise HFMappingError(f"{architecture} cannot hold model={args.name}: it is "
                             f"{'a mixture of experts' if args.is_moe else 'dense'}")
    config = {k: v for k, v in dict(base or {}).items() if k not in ("rope_scaling", "rope_theta", "rope_parameters")}
    head_dim = args.kv_channels or args.hidden_size // args.num_attention_heads
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
    if args.rope_scaling:
        rope = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), **_LLAMA3_ROPE_FIXED,
                "rope_theta": float(args.rotary_base)}
    config.update(
        architectures=[architecture], model_type=ARCHITECTURES[architecture],
        hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups, head_dim=head_dim, vocab_size=args.vocab_size,
        max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.norm_epsilon,
        tie_word_embeddings=args.tie_word_embeddings, hidden_act="silu",
        # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta/rope_scaling.
        rope_parameters=rope, rope_theta=float(args.rotary_base),
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if args.rope_scaling else None,
    )
    if architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        config.update(attention_bias=False)
    if architecture == "LlamaForCausalLM":
        config.update(mlp_bias=False)
    if architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
        config.setdefault("sliding_window", None)
    if args.is_moe:
        config.update(moe_hf_config(args, architecture))
    return config


def _is_moe_architecture(architecture: str) -> bool:
    return ARCHITECTURES.get(architecture) in ("mixtral", "qwen2_moe", "qwen3_moe")


def args_to_yaml_dict(args: ModelArgs) -> dict[str, Any]:
    """conf/model/*.yaml content for `args` (ModelArgs.from_config reads it back)."""
    return asdict(args)


def with_overrides(args: ModelArgs, overrides: Mapping[str, Any]) -> ModelArgs:
    return replace(args, **overrides)


# ----------------------------------------------------------------------------------------------
# tensor layouts


def head_dim(args: ModelArgs) -> int:
    return args.kv_channels or args.hidden_size // args.num_attention_heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """HF q/k/v projections (weights [out, in] or biases [out]) -> megatron's per-group interleaved linear_qkv."""
    groups, d = args.num_query_groups, head_dim(args)
    rest = q.shape[1:]
    q = q.reshape(groups, (args.num_attention_heads // groups) * d, *rest)
    k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = args.num_query_groups, head_dim(args)
    per_group = args.num_attention_heads // groups * d
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, per_group + 2 * d, *rest).split([per_group, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_vocab(weight: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """[vocab, hidden] -> [padded_vocab, hidden] with zero rows appended."""
    if weight.size(0) != args.vocab_size:
        raise HFMappingError(f"vocabulary tensor has {weight.size(0)} rows, config.json says vocab_size={args.vocab_size}")
    extra = args.padded_vocab_size - weight.size(0)
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]) if extra else weight


def cut_vocab(weight: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    return weight[: args.vocab_size]


# ----------------------------------------------------------------------------------------------
# HF -> ShardForge (module state_dict names)

_HF_LAYER = "model.layers.{i}."
# one-to-one layer tensors: HF suffix -> megatron module suffix
_LAYER_PLAIN = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
}
_QK_NORM = {"self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
            "self_attn.k_norm.weight": "self_attention.k_layernorm.weight"}


_DENSE_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def hf_tensor_names(args: ModelArgs, architecture: str | None = None) -> list[str]:
    """Every tensor name an HF checkpoint of this shape holds (what import needs)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not args.tie_word_embeddings:
        names.append("lm_head.weight")
    for i, moe in enumerate(args.moe_layer_pattern()):
        hf = _HF_LAYER.format(i=i)
        names += [hf + s for s in _layer_hf_suffixes(args)]
        if moe:
            names += moe_layer_hf_names(args, architecture or default_architecture(args), hf)
        else:
            names += [hf + s for s in _DENSE_MLP]
    return names


def _layer_hf_suffixes(args: ModelArgs) -> list[str]:
    """Attention and norm tensors of a layer (its MLP is dense or MoE)."""
    suffixes = [*_LAYER_PLAIN, "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    if args.add_qkv_bias:
        suffixes += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if args.qk_layernorm:
        suffixes += list(_QK_NORM)
    return suffixes


def hf_to_shardforge(get: Callable[[str], torch.Tensor], args: ModelArgs, architecture: str | None = None):
    """Yield (module state_dict name, tensor) for the whole model, reading HF tensors through
    `get(name)` one at a time (the caller decides how many stay in memory: here, at most one
    layer's worth of q/k/v or gate/up)."""
    yield "embedding.word_embeddings.weight", pad_vocab(get("model.embed_tokens.weight"), args)
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not args.tie_word_embeddings:
        yield "output_layer.weight", pad_vocab(get("lm_head.weight"), args)
    pattern = args.moe_layer_pattern()
    for i in range(args.num_layers):
        hf, ours = _HF_LAYER.format(i=i), f"decoder.layers.{i}."
        for src, dst in _LAYER_PLAIN.items():
            yield ours + dst, get(hf + src)
        if args.qk_layernorm:
            for src, dst in _QK_NORM.items():
                yield ours + dst, get(hf + src)
        yield ours + "self_attention.linear_qkv.weight", fuse_qkv(
            *(get(f"{hf}self_attn.{p}_proj.weight") for p in "qkv"), args)
        if args.add_qkv_bias:
            yield ours + "self_attention.linear_qkv.bias", fuse_qkv(
                *(get(f"{hf}self_attn.{p}_proj.bias") for p in "qkv"), args)
        if pattern[i]:
            yield from moe_layer_to_shardforge(get, args, architecture or default_architecture(args), hf, ours)
            continue
        yield ours + "mlp.linear_fc1.weight", torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
        yield ours + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")


# ----------------------------------------------------------------------------------------------
# ShardForge (dist-checkpoint keys, stacked over layers) -> HF

CKPT_LAYER = "decoder.layers."
# checkpoint key (without the "decoder.layers." prefix) -> HF layer suffix
_CKPT_PLAIN = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


def checkpoint_layer_keys(args: ModelArgs) -> list[str]:
    """The per-layer checkpoint keys (prefix included) export reads. Stacked over layers when every
    layer has the same modules; an MoE model with dense layers has one key per layer instead
    (decoder.layers.{i}.<rest>)."""
    keys = ["self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight",
            "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight"]
    pattern = args.moe_layer_pattern()
    if not all(pattern):
        keys += ["mlp.linear_fc2.weight", "mlp.linear_fc1.weight"]
    if any(pattern):
        keys += moe_checkpoint_suffixes(args)
    if args.add_qkv_bias:
        keys.append("self_attention.linear_qkv.bias")
    if args.qk_layernorm:
        keys += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    return [CKPT_LAYER + k for k in keys]


def checkpoint_global_keys(args: ModelArgs) -> list[str]:
    keys = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not args.tie_word_embeddings:
        keys.append("output_layer.weight")
    return keys


def global_to_hf(key: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    if key == "embedding.word_embeddings.weight":
        return "model.embed_tokens.weight", cut_vocab(tensor, args)
    if key == "output_layer.weight":
        return "lm_head.weight", cut_vocab(tensor, args)
    if key == "decoder.final_layernorm.weight":
        return "model.norm.weight", tensor
    raise KeyError(key)


def layer_to_hf(layer: int, tensors: Mapping[str, torch.Tensor], args: ModelArgs,
                architecture: str | None = None) -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors (keyed like checkpoint_layer_keys, layer axis removed) -> HF tensors."""

    hf = _HF_LAYER.format(i=layer)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        short = key[len(CKPT_LAYER):]
        if short in _CKPT_PLAIN:
            out[hf + _CKPT_PLAIN[short]] = tensor
        elif short == "self_attention.linear_qkv.weight" or short == "self_attention.linear_qkv.bias":
            kind = short.rsplit(".", 1)[1]
            for p, t in zip("qkv", split_qkv(tensor, args)):
                out[f"{hf}self_attn.{p}_proj.{kind}"] = t
        elif short == "mlp.linear_fc1.weight":
            gate, up = tensor.chunk(2, dim=0)
            out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        elif short == "mlp.linear_fc2.weight":
            out[hf + "mlp.down_proj.weight"] = tensor
        elif (moe := moe_to_hf(short, tensor, architecture or default_architecture(args), hf)) is not None:
            out.update(moe)
        else:
            raise KeyError(key)
    return out
