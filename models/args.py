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

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        return cls(**dict(cfg))

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)

    def flops_shape(self) -> dict[str, int]:
        """Keyword arguments for launcher.flops.train_flops_per_token."""
        return dict(num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
                    num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
                    vocab_size=self.padded_vocab_size, kv_channels=self.kv_channels)
