"""RoPE for the torch backend on GPU.

megatron-core without TransformerEngine/apex applies rotary embeddings unfused: cos and sin of
the frequencies, rotate-half through two cats, three multiplies and an add — each a pass over q
or k in memory. torch.compile turns the same function into one generated kernel per direction,
so the maths (and its reference, the unfused function) stay megatron's own.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

unfused_rope_bshd = rope_utils._apply_rotary_pos_emb_bshd
# dynamic=None: static shapes first, one dynamic recompile when packed rows change length.
fused_rope_bshd = torch.compile(unfused_rope_bshd, fullgraph=True)


def use_fused_rope() -> None:
    """Route megatron's apply_rotary_pos_emb (dense and THD) through the compiled kernel."""
    rope_utils._apply_rotary_pos_emb_bshd = fused_rope_bshd
