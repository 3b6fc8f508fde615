"""Core attention for the `torch` backend: torch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materializes the s×s score matrix (memory quadratic
in the sequence length); SDPA dispatches to cuDNN / flash / memory-efficient kernels on GPU
and to a fused CPU kernel, with grouped-query attention handled natively. On CUDA the `backend`
option pins one kernel (`auto` leaves the choice to SDPA's dispatch order).

Packed rows (THD layout, documents delimited by cu_seqlens) go through
`torch.nn.attention.varlen.varlen_attn` on GPU and through SDPA with an exact block-diagonal
causal mask on CPU: no token ever attends across a document boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.kernels import ATTENTION_BACKENDS

_SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


class SDPAttention(MegatronModule):
    """Drop-in `core_attention` for megatron-core's SelfAttention (same constructor/forward)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None, pg_collection=None,
                 backend: str = "auto"):
        super().__init__(config=config)
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r} ({' | '.join(ATTENTION_BACKENDS)})")
        self.backend = backend
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.softmax_scale
        # From the config, not the tensors: a plain bool stays static under torch.compile.
        self.gqa = (config.num_query_groups or config.num_attention_heads) != config.num_attention_heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        # value is a view into the fused qkv projection output; attention saves it for backward,
        # which would keep that whole buffer alive next to RoPE's rotated q and k copies. A
        # contiguous value (a copy of 1/4 of it) lets the buffer go: 48 MB a layer at the bench shape.
        value = value.contiguous()
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by the SDPA core attention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # megatron's mask marks positions to drop (True = masked); SDPA's marks those to keep.
        mask = None if causal or attention_mask is None else ~attention_mask
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        if self.backend == "auto" or not query.is_cuda:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                                 dropout_p=dropout_p, enable_gqa=self.gqa)
        else:
            # one kernel, no fall-through: a call it cannot take raises (with SDPA's reason warned)
            with sdpa_kernel([_SDPA_BACKENDS[self.backend]]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                     scale=self.softmax_scale, dropout_p=dropout_p, enable_gqa=self.gqa)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params) -> torch.Tensor:
        """THD: query/key/value [t, heads, d] (megatron squeezed the dummy batch) -> [t, heads * d]."""
        if params.qkv_format != "thd":
            raise NotImplementedError(f"packed qkv_format {params.qkv_format!r} (only 'thd')")
        t = query.size(0)
        cu_q, cu_k = params.cu_seqlens_q, params.cu_seqlens_kv
        if query.is_cuda:
            out = _varlen_causal(query, key, value, cu_q, cu_k, int(params.max_seqlen_q), int(params.max_seqlen_kv),
                                 self.softmax_scale)
        else:
            mask = block_causal_mask(cu_q, t, query.device)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, d]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale,
                                                 enable_gqa=self.gqa)
            out = out.squeeze(0).transpose(0, 1)
        return out.reshape(t, -1)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """[total, total] bool, True where query i may attend key j: same document and j <= i."""
    position = torch.arange(total, device=device)
    document = torch.searchsorted(cu_seqlens[1:].to(device=device, dtype=torch.long), position, right=True)
    return (document[:, None] == document[None, :]) & (position[None, :] <= position[:, None])


def _varlen_causal(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if q.size(1) != k.size(1):  # torch 2.11's varlen_attn has no GQA: expand the key/value heads
        repeat = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    # window (-1, 0) is causal; varlen_attn's default window is bidirectional.
    return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scale=scale,
                       window_size=(-1, 0))
