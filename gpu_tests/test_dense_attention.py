"""The dense core attention on CUDA with each pinned SDPA kernel (`train.attention_backend`), fed
megatron's [s, b, heads, d] tensors as the model feeds it: output and input gradients against fp32
attention, each bf16 kernel within twice the flash kernel's own error (or 1e-3 relative)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from models.kernels.attention import SDPAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _attention(backend: str, heads: int, kv_heads: int, dim: int) -> SDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=kv_heads, kv_channels=dim, attention_dropout=0.0)
    return SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                        backend=backend)


@pytest.mark.parametrize("seq", [1000, 4096])
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 16, 64), (16, 8, 128)], ids=["mha64", "gqa128"])
def test_pinned_kernels_match_fp32(seq, heads, kv_heads, dim):
    torch.manual_seed(seq)
    q, k, v = (torch.randn(seq, 2, h, dim, device="cuda", dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(seq, 2, heads * dim, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out, *(x.grad for x in leaves)]

    def reference(a, b, c):  # fp32, [s, b, h, d] -> [s, b, h * d]
        a, b, c = (t.float().permute(1, 2, 0, 3) for t in (a, b, c))
        out = F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=heads != kv_heads)
        return out.permute(2, 0, 1, 3).reshape(seq, 2, -1)

    want = run(reference)
    results = {backend: run(lambda a, b, c, m=_attention(backend, heads, kv_heads, dim): m(a, b, c, None))
               for backend in ("flash", "cudnn", "auto")}
    for name, i in (("out", 0), ("dq", 1), ("dk", 2), ("dv", 3)):
        flash = _error(results["flash"][i], want[i])
        for backend in ("cudnn", "auto"):
            err = _error(results[backend][i], want[i])
            print(f"seq {seq} {heads}/{kv_heads}x{dim} {name}: {backend} {err:.2e}, flash {flash:.2e}")
            assert err <= max(2 * flash, 1e-3), f"{backend} {name}: relative error {err:.2e}, flash's {flash:.2e}"
