"""Model FLOPs per token and MFU, the one formula every report in ShardForge uses.

PaLM-style accounting (Chowdhury et al. 2022, appendix B): 6 FLOPs per parameter per token
for the matmuls (forward + backward) plus the attention score/value matmuls,
12 * layers * hidden * seq per token for full attention; a causal kernel skips half of it,
but like Megatron-LM and torchtitan we count the full amount so numbers compare to theirs.
Embedding lookups are not matmuls and are not counted; the output projection is.
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by substring of the device name.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def matmul_params(*, num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
                  num_query_groups: int, vocab_size: int, kv_channels: int | None = None,
                  gated_mlp: bool = True) -> int:
    """Parameters that take part in a matmul per token (attention, MLP, output layer)."""
    head_dim = kv_channels or hidden_size // num_attention_heads
    q = hidden_size * num_attention_heads * head_dim
    kv = 2 * hidden_size * num_query_groups * head_dim
    proj = num_attention_heads * head_dim * hidden_size
    mlp = (3 if gated_mlp else 2) * hidden_size * ffn_hidden_size
    return num_layers * (q + kv + proj + mlp) + vocab_size * hidden_size


def train_flops_per_token(*, seq_length: int, num_layers: int, hidden_size: int, num_attention_heads: int,
                          kv_channels: int | None = None, **shape) -> float:
    """Forward + backward FLOPs for one trained token at this sequence length."""
    n = matmul_params(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                      kv_channels=kv_channels, **shape)
    head_dim = kv_channels or hidden_size // num_attention_heads
    attn = 12 * num_layers * num_attention_heads * head_dim * seq_length
    return 6.0 * n + attn


def peak_flops(device: torch.device) -> float | None:
    """bf16 peak of this accelerator, or None where it is unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)
