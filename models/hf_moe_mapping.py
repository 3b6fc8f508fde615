"""Hugging Face ⇄ ShardForge for the MLP of mixture-of-experts models: Mixtral, Qwen2-MoE (gated
shared expert, q/k/v bias) and Qwen3-MoE (qk-norm). Attention, norms and vocabulary map as in
models.hf_mapping, which calls into this module for MoE architectures.

Routing: transformers takes a softmax over all experts, then the top k. Mixtral and Qwen's
`norm_topk_prob=true` renormalize the k weights, which equals megatron's top-k of the logits
followed by a softmax over those k (moe_router_pre_softmax=false); `norm_topk_prob=false` keeps
them (pre_softmax=true). Qwen2-MoE scales its shared expert by sigmoid(shared_expert_gate(x)),
megatron's moe_shared_expert_gate. Qwen's dense layers (`mlp_only_layers`, `decoder_sparse_step`)
become moe_layer_freq's 0/1 pattern.

Names (ShardForge module state_dict at ep=1 | dist-checkpoint key without "decoder.layers."):
    router          mlp.router.weight [E, h]                   | same
    routed expert e mlp.experts.local_experts.{e}.linear_fc1   | mlp.experts.experts.linear_fc1.weight [E, 2f, h]
                    mlp.experts.local_experts.{e}.linear_fc2   | mlp.experts.experts.linear_fc2.weight [E, h, f]
    shared expert   mlp.shared_experts.linear_fc1/fc2.weight, mlp.shared_experts.gate_weight [1, h]
fc1 = cat([gate, up]) as in dense MLPs.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch

from models.args import ModelArgs
from models.hf_error import HFMappingError

MIXTRAL, QWEN2_MOE, QWEN3_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"
MOE_ARCHITECTURES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
# per architecture: the HF module of the MoE block and an expert's (gate, up, down) projection names
_BLOCK = {MIXTRAL: ("block_sparse_moe", ("w1", "w3", "w2")),
          QWEN2_MOE: ("mlp", ("gate_proj", "up_proj", "down_proj")),
          QWEN3_MOE: ("mlp", ("gate_proj", "up_proj", "down_proj"))}
_ROUTER, _FC1, _FC2 = "mlp.router.weight", "mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight"
_SHARED_FC1, _SHARED_FC2 = "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"
_SHARED_GATE = "mlp.shared_experts.gate_weight"


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelArgs


def moe_fields_from_hf(config: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """ModelArgs MoE fields of an MoE config.json."""
    layers = int(config["num_hidden_layers"])
    fields: dict[str, Any] = dict(moe_router_topk=int(config["num_experts_per_tok"]),
                                  moe_aux_loss_coeff=float(config.get("router_aux_loss_coef") or 0.0))
    if arch == MIXTRAL:
        return {**fields, "num_experts": int(config["num_local_experts"]),
                "moe_ffn_hidden_size": int(config["intermediate_size"]), "moe_router_pre_softmax": False}
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (an attribute alias)
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    if experts < 1:
        raise HFMappingError(f"config.json: num_experts={experts} ({arch} without experts is not supported)")
    step, dense = int(config.get("decoder_sparse_step") or 1), set(config.get("mlp_only_layers") or [])
    pattern = tuple(int(i not in dense and (i + 1) % step == 0) for i in range(layers))
    shared = int(config.get("shared_expert_intermediate_size") or 0) if arch == QWEN2_MOE else 0
    if arch == QWEN2_MOE and shared < 1:
        raise HFMappingError("config.json: shared_expert_intermediate_size=0 is not supported (Qwen2-MoE's shared "
                             "expert and its gate would be empty)")
    return {**fields, "num_experts": experts, "moe_ffn_hidden_size": int(config["moe_intermediate_size"]),
            "moe_router_pre_softmax": not bool(config.get("norm_topk_prob", False)),
            "moe_layer_freq": 1 if all(pattern) else pattern,
            "moe_shared_expert_intermediate_size": shared or None, "moe_shared_expert_gate": bool(shared)}


def default_moe_architecture(args: ModelArgs) -> str:
    if args.qk_layernorm:
        return QWEN3_MOE
    if args.add_qkv_bias or args.moe_shared_expert_intermediate_size:
        return QWEN2_MOE
    return MIXTRAL


def moe_hf_config(args: ModelArgs, arch: str) -> dict[str, Any]:
    """The MoE fields of config.json; raises HFMappingError if `arch` cannot compute what `args` does."""
    unsupported = [(args.moe_router_score_function != "softmax", f"moe_router_score_function="
                    f"{args.moe_router_score_function}"),
                   (args.moe_router_enable_expert_bias, "moe_router_enable_expert_bias=true"),
                   (args.moe_router_num_groups is not None, "group-limited routing (moe_router_num_groups)"),
                   (args.moe_router_topk_scaling_factor is not None, "moe_router_topk_scaling_factor"),
                   (arch == MIXTRAL and args.moe_router_pre_softmax, "moe_router_pre_softmax=true (no renormalization)"),
                   (arch == MIXTRAL and not all(args.moe_layer_pattern()), "dense layers between MoE layers"),
                   (arch == QWEN2_MOE and not (args.moe_shared_expert_intermediate_size and args.moe_shared_expert_gate),
                    "routed experts without a gated shared expert"),
                   (arch != QWEN2_MOE and bool(args.moe_shared_expert_intermediate_size), "a shared expert")]
    reasons = [why for bad, why in unsupported if bad]
    if reasons:
        raise HFMappingError(f"{arch} cannot hold model={args.name}: {'; '.join(reasons)}")
    ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    common = dict(num_experts_per_tok=args.moe_router_topk, router_aux_loss_coef=args.moe_aux_loss_coeff,
                  output_router_logits=False)
    if arch == MIXTRAL:
        return {**common, "num_local_experts": args.num_experts, "intermediate_size": ffn}
    config = {**common, "num_experts": args.num_experts, "num_local_experts": args.num_experts,
              "moe_intermediate_size": ffn,
              "norm_topk_prob": not args.moe_router_pre_softmax, "decoder_sparse_step": 1,
              "mlp_only_layers": [i for i, moe in enumerate(args.moe_layer_pattern()) if not moe]}
    if arch == QWEN2_MOE:
        config.update(shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size, qkv_bias=True)
    return config


# ----------------------------------------------------------------------------------------------
# HF -> ShardForge (module state_dict names, one layer)


def _hf_names(arch: str, hf: str) -> tuple[str, Callable[[int], tuple[str, str, str]]]:
    block, (gate, up, down) = _BLOCK[arch]
    expert = lambda e: tuple(f"{hf}{block}.experts.{e}.{p}.weight" for p in (gate, up, down))  # noqa: E731
    return f"{hf}{block}.gate.weight", expert


def moe_layer_hf_names(args: ModelArgs, arch: str, hf: str) -> list[str]:
    """The HF tensors of one MoE layer's MLP; `hf` is the layer prefix (model.layers.{i}.)."""
    router, expert = _hf_names(arch, hf)
    names = [router, *(name for e in range(args.num_experts) for name in expert(e))]
    if args.moe_shared_expert_intermediate_size:
        names += [f"{hf}mlp.shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        names.append(f"{hf}mlp.shared_expert_gate.weight")
    return names


def moe_layer_to_shardforge(get: Callable[[str], torch.Tensor], args: ModelArgs, arch: str, hf: str,
                            ours: str) -> Iterator[tuple[str, torch.Tensor]]:
    router, expert = _hf_names(arch, hf)
    yield ours + _ROUTER, get(router)
    for e in range(args.num_experts):
        gate, up, down = expert(e)
        yield f"{ours}mlp.experts.local_experts.{e}.linear_fc1.weight", torch.cat([get(gate), get(up)])
        yield f"{ours}mlp.experts.local_experts.{e}.linear_fc2.weight", get(down)
    if args.moe_shared_expert_intermediate_size:
        shared = f"{hf}mlp.shared_expert."
        yield ours + _SHARED_FC1, torch.cat([get(shared + "gate_proj.weight"), get(shared + "up_proj.weight")])
        yield ours + _SHARED_FC2, get(shared + "down_proj.weight")
        yield ours + _SHARED_GATE, get(f"{hf}mlp.shared_expert_gate.weight")


# ----------------------------------------------------------------------------------------------
# ShardForge (dist-checkpoint keys) -> HF, one layer


def moe_checkpoint_suffixes(args: ModelArgs) -> list[str]:
    suffixes = [_ROUTER, _FC1, _FC2]
    if args.moe_shared_expert_intermediate_size:
        suffixes += [_SHARED_FC1, _SHARED_FC2, _SHARED_GATE]
    return suffixes


def moe_checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Global shape of one MoE layer's tensors in a dist checkpoint (layer axis not included)."""
    h, e, f = args.hidden_size, args.num_experts, args.moe_ffn_hidden_size or args.ffn_hidden_size
    shapes = {_ROUTER: (e, h), _FC1: (e, 2 * f, h), _FC2: (e, h, f)}
    if args.moe_shared_expert_intermediate_size:
        s = args.moe_shared_expert_intermediate_size
        shapes.update({_SHARED_FC1: (2 * s, h), _SHARED_FC2: (h, s), _SHARED_GATE: (1, h)})
    return shapes


def moe_to_hf(suffix: str, tensor: torch.Tensor, arch: str, hf: str) -> dict[str, torch.Tensor] | None:
    """HF tensors of one MoE checkpoint tensor of a layer (None: not an MoE key)."""
    router, expert = _hf_names(arch, hf)
    if suffix == _ROUTER:
        return {router: tensor}
    if suffix == _FC1:
        return {name: t for e in range(tensor.size(0)) for name, t in zip(expert(e)[:2], tensor[e].chunk(2, dim=0))}
    if suffix == _FC2:
        return {expert(e)[2]: tensor[e] for e in range(tensor.size(0))}
    if suffix == _SHARED_FC1:
        gate, up = tensor.chunk(2, dim=0)
        return {f"{hf}mlp.shared_expert.gate_proj.weight": gate, f"{hf}mlp.shared_expert.up_proj.weight": up}
    if suffix == _SHARED_FC2:
        return {f"{hf}mlp.shared_expert.down_proj.weight": tensor}
    if suffix == _SHARED_GATE:
        return {f"{hf}mlp.shared_expert_gate.weight": tensor}
    return None
