"""Layer specs: which modules implement a Llama-style decoder layer, per kernel backend.

`torch`: megatron-core's own parallel linears, models/kernels' RMSNorm and the SDPA core attention.
`te`: megatron-core's TransformerEngine spec (fused norm+linear, TE attention) when
TransformerEngine imports. Models take a spec and never name a backend themselves.
"""
from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from models.kernels.attention import SDPAttention
from models.kernels.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from models.kernels.grouped_experts import GroupedGemmExperts
from models.kernels.norm import RMSNorm
from models.mlp_act_recompute import ActivationRecomputeMLP


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def default_backend() -> str:
    return "te" if transformer_engine_available() else "torch"


def dense_decoder_block_spec(backend: str, config: TransformerConfig, vp_stage: int | None,
                             qk_layernorm: bool, fp8: bool = False) -> ModuleSpec | TransformerBlockSubmodules:
    """The layers of this pipeline (virtual) stage of a dense model, and its final norm. `fp8`
    (torch backend): the layers' four linears run fp8 GEMMs (models/kernels/fp8_linear.py)."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r} (torch | te)")
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    if config.recompute_granularity == "selective" and "mlp_act" in config.recompute_modules:
        layer.mlp.module = ActivationRecomputeMLP
    if fp8:
        attention.linear_qkv = layer.mlp.submodules.linear_fc1 = Fp8ColumnParallelLinear
        attention.linear_proj = layer.mlp.submodules.linear_fc2 = Fp8RowParallelLinear
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=RMSNorm)


def moe_decoder_block_spec(backend: str, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The layers of this pipeline (virtual) stage of an MoE model: megatron's MoE or dense layer
    per `config.moe_layer_freq`.

    Experts keep megatron's SequentialMLP parameters; on Hopper GPUs they run as torch grouped
    GEMMs (models/kernels/grouped_experts.py), elsewhere as SequentialMLP's loop.
    Norms are models/kernels' RMSNorm, which also runs sequence parallel (MoELayer requires it
    under TP).
    """
    if backend == "te":
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r} (torch | te)")
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    for spec in block.layer_specs:
        layer, attention = spec.submodules, spec.submodules.self_attention.submodules
        attention.core_attention = SDPAttention
        experts = getattr(layer.mlp.submodules, "experts", None)  # MoE layers only
        if experts is not None and experts.module is SequentialMLP:
            experts.module = GroupedGemmExperts
        layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
        if config.qk_layernorm:
            attention.q_layernorm = attention.k_layernorm = RMSNorm
    block.layer_norm = RMSNorm
    return block
