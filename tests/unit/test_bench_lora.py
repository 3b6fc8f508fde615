"""bench/bench_lora.py's ratios and the transformers + peft peer's LoRA wrapping (bench.hf_baseline.apply_lora):
only the adapters train, and at init (B zero) the wrapped model gives the base model's loss. fp32 on CPU."""
from __future__ import annotations

import pytest
import torch

from bench import hf_baseline as hb
from bench.bench_lora import lora_ratios

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            kv_channels=None, vocab_size=96, max_position_embeddings=128, rotary_base=10000,
            rope_scaling=False, norm_epsilon=1e-5, tie_word_embeddings=False, add_qkv_bias=False,
            init_method_std=0.02)


def test_lora_ratios():
    full = {"peak_mem_gb": 20.0, "loss_tokens_per_s": 10.0, "tokens_per_s": 20.0}
    lora = {"peak_mem_gb": 10.0, "loss_tokens_per_s": 30.0, "tokens_per_s": 40.0}
    peer = {"peak_mem_gb": 12.0, "loss_tokens_per_s": 20.0, "tokens_per_s": 50.0}
    assert lora_ratios(full, lora, peer) == {"memory_lora_over_full": 0.5, "loss_tokens_per_s_over_peer": 1.5,
                                             "tokens_per_s_over_peer": 0.8}
    cpu = lora_ratios({**full, "peak_mem_gb": None}, {**lora, "peak_mem_gb": None}, None)
    assert cpu == {"memory_lora_over_full": None, "loss_tokens_per_s_over_peer": None, "tokens_per_s_over_peer": None}


@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
def test_peft_peer_trains_the_adapters_only(adapter_dtype):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if adapter_dtype == "bf16" else torch.float32
    base = hb.build_model(TINY, torch.device("cpu"), dtype, "eager")
    ids = torch.randint(0, TINY["vocab_size"], (1, 24))
    with torch.no_grad():
        expected = base(input_ids=ids, labels=ids).loss
    rank = 4
    model = hb.apply_lora(base, rank=rank, alpha=8, adapter_dtype=adapter_dtype)
    assert hb.causal_lm(model) is base
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values()) == (adapter_dtype == "fp32")
    h, kv = TINY["hidden_size"], TINY["num_query_groups"] * TINY["hidden_size"] // TINY["num_attention_heads"]
    f = TINY["ffn_hidden_size"]
    per_layer = rank * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h))  # q, o; k, v; gate, up; down
    assert sum(p.numel() for p in trainable.values()) == TINY["num_layers"] * per_layer
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, expected)
