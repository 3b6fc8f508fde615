"""Self-attention whose RoPE runs models/kernels/rope.py (torch backend, CUDA).

megatron-core's SelfAttention applies rotary embeddings through module functions of its own
(rope_utils, or TransformerEngine's fused qkv RoPE) that a spec cannot replace. This subclass
takes the rotary embedding out of megatron's forward and applies it where megatron's forward
gets q, k and v (`get_query_key_value_tensors`), with the same kernels in the same order:
- unpacked rows: one pass over the fused qkv projection writes rotated q, rotated k and a
  contiguous v (`fused_qkv_rope`) where that applies (no q/k norms, no context parallelism,
  at least one query group per tensor-parallel rank);
- otherwise q, then k, each through `fused_rope_bshd` (packed THD rows: `fused_rope_thd`).
Inference (a KV cache) and layers without RoPE run megatron's forward unchanged.
"""
from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention, _yarn_get_concentration_factor_from_config
from megatron.core.transformer.identity_op import IdentityOp

from models.kernels.rope import fused_qkv_rope, fused_rope_bshd, fused_rope_thd


class RopeSelfAttention(SelfAttention):
    # (rotary embedding, packed_seq_params) of the forward in progress, for get_query_key_value_tensors
    _pending_rope = None

    def forward(self, hidden_states, attention_mask, **kwargs):
        rope = kwargs.get("rotary_pos_emb")
        no_rope = self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]
        inference = kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None
        if rope is None or no_rope or inference:
            return super().forward(hidden_states, attention_mask, **kwargs)
        self._pending_rope = (rope if isinstance(rope, tuple) else (rope, rope), kwargs.get("packed_seq_params"))
        return super().forward(hidden_states, attention_mask, **{**kwargs, "rotary_pos_emb": None})

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        pending, self._pending_rope = self._pending_rope, None
        if pending is None:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        (q_freqs, k_freqs), packed = pending
        if packed is None and not output_gate and q_freqs is not None and k_freqs is not None \
                and self._fused_qkv_applies():
            mixed_qkv, split_arg_list = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                                            split_qkv=False)
            return fused_qkv_rope(mixed_qkv, q_freqs, k_freqs, split_arg_list)
        query, key, *rest = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate,
                                                                split_qkv)
        thd = packed is not None and packed.qkv_format == "thd"
        if q_freqs is not None:
            query = self._rotate(query, q_freqs, packed.cu_seqlens_q_padded if thd else None,
                                 packed.cu_seqlens_q if thd else None)
        if k_freqs is not None:
            key = self._rotate(key, k_freqs, packed.cu_seqlens_kv_padded if thd else None,
                               packed.cu_seqlens_kv if thd else None)
        return (query, key, *rest)

    def _fused_qkv_applies(self) -> bool:
        # megatron's conditions for its fused_single_qkv_rope path, plus what the kernel needs
        return (not self.config.test_mode and not self.config.flash_decode
                and (self.q_layernorm is None or isinstance(self.q_layernorm, IdentityOp))
                and (self.k_layernorm is None or isinstance(self.k_layernorm, IdentityOp))
                and self.config.context_parallel_size == 1 and self.config.num_query_groups >= self.world_size)

    def _rotate(self, t, freqs, cu_seqlens_padded, cu_seqlens):
        """megatron's apply_rotary_pos_emb (unfused) on t as get_query_key_value_tensors returns it:
        [s, b, heads, d], or [t, 1, heads, d] for packed rows (megatron squeezes the 1 after)."""
        config, mscale = self.config, _yarn_get_concentration_factor_from_config(self.config)
        if cu_seqlens is None:
            return fused_rope_bshd(t, freqs, config.rotary_interleaved, config.multi_latent_attention, mscale)
        cu = cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens
        return fused_rope_thd(t.squeeze(1), cu, freqs, config.rotary_interleaved, config.multi_latent_attention,
                              mscale, self.pg_collection.cp).unsqueeze(1)
