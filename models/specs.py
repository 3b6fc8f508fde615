"""Layer specs: which modules implement a Llama-style decoder layer, per kernel backend.

`torch`: megatron-core's own parallel linears, torch RMSNorm and the SDPA core attention.
`te`: megatron-core's TransformerEngine spec (fused norm+linear, TE attention) when
TransformerEngine imports. Models take a spec and never name a backend themselves.
"""
from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from models.kernels.attention import SDPAttention


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def default_backend() -> str:
    return "te" if transformer_engine_available() else "torch"


def decoder_layer_spec(backend: str, qk_layernorm: bool) -> ModuleSpec:
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r} (torch | te)")
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
