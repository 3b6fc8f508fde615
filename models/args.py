"""The shape of a Llama-family model (conf/model/*.yaml), free of any framework import so that
configs can be validated before megatron-core or process groups are touched."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

VOCAB_MULTIPLE = 128  # the padded vocab must not depend on TP, or layouts would train different models


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama-family model; mirrors conf/model/*.yaml."""
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    kv_channels: int | None = None
    rotary_base: float = 10000
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    # Mixture of experts (megatron-core MoELayer). num_experts=None is a dense model and every
    # field below is then ignored.
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None             # per-expert FFN width; None = ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None  # total width of the shared expert(s)
    moe_shared_expert_gate: bool = False               # Qwen2-MoE's sigmoid gate on the shared expert
    moe_layer_freq: int | tuple[int, ...] = 1          # every N-th layer is MoE, or a 0/1 pattern per layer
    moe_router_score_function: str = "softmax"         # softmax | sigmoid
    moe_router_pre_softmax: bool = False               # softmax over all experts before top-k (no renorm)
    moe_router_topk_scaling_factor: float | None = None
    moe_router_enable_expert_bias: bool = False        # DeepSeek-V3 aux-loss-free balancing (sigmoid only)
    moe_router_bias_update_rate: float = 1e-3
    moe_router_load_balancing_type: str = "aux_loss"   # aux_loss | seq_aux_loss | none
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_router_num_groups: int | None = None           # group-limited routing (DeepSeek device/node limit)
    moe_router_group_topk: int | None = None
    moe_token_dispatcher_type: str = "alltoall"        # alltoall | allgather
    moe_expert_capacity_factor: float | None = None    # None = dropless

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        values = dict(cfg)
        freq = values.get("moe_layer_freq")
        if freq is not None and not isinstance(freq, int):  # a YAML list: keep the frozen args hashable
            values["moe_layer_freq"] = tuple(int(x) for x in freq)
        return cls(**values)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one, per layer (megatron's moe_layer_freq rule)."""
        if not self.is_moe:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]
        return list(self.moe_layer_freq)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)

    def active_ffn_width(self) -> float:
        """MLP width one token passes through, averaged over layers: top-k routed experts plus
        the shared expert in MoE layers (MFU counts active parameters); the router is ignored."""
        if not self.is_moe:
            return self.ffn_hidden_size
        moe = self.moe_router_topk * (self.moe_ffn_hidden_size or self.ffn_hidden_size)
        moe += self.moe_shared_expert_intermediate_size or 0
        pattern = self.moe_layer_pattern()
        return sum(moe if is_moe else self.ffn_hidden_size for is_moe in pattern) / self.num_layers

    def flops_shape(self) -> dict[str, int]:
        """Keyword arguments for launcher.flops.train_flops_per_token."""
        return dict(num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.active_ffn_width(),
                    num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
                    vocab_size=self.padded_vocab_size, kv_channels=self.kv_channels)
