"""Causal attention forward + backward through each SDPA backend torch has on this GPU, at long sequences.

    python -m bench.bench_attention --lengths 32768,131072

The bench shape's attention (16 query heads, 8 K/V heads, head dim 128, bf16, one sequence),
`enable_gqa=True` as models/kernels/attention.py calls it. TF/s counts the causal work only
(half of the full score/value matmuls: forward 2·2·s²·h·d / 2, backward 2.5× that).
`--layouts`: `bhsd` contiguous [b, heads, s, d] tensors; `sbhd` megatron's [s, b, heads, d] tensors
permuted to [b, heads, s, d] views, as the core attention passes them; `bhsd-expanded` contiguous
with the K/V heads repeated to the query heads (`enable_gqa=False`).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.cuda_timing import time_us
from bench.results_io import invocation, write_result

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


LAYOUTS = ("bhsd", "sbhd", "bhsd-expanded")


def measure(backend: str, seq: int, heads: int, groups: int, dim: int, repeats: int, layout: str = "bhsd") -> dict:
    def leaf(h: int) -> torch.Tensor:
        if layout == "sbhd":
            return torch.randn(seq, 1, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return torch.randn(1, h, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = leaf(heads), leaf(groups), leaf(groups)
    grad = (torch.randn(seq, 1, heads, dim, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
            if layout == "sbhd" else torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16))
    gqa = groups != heads and layout != "bhsd-expanded"

    def inputs():
        qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v)) if layout == "sbhd" else (q, k, v)
        if layout == "bhsd-expanded":
            kk, vv = (t.repeat_interleave(heads // groups, dim=1) for t in (kk, vv))
        return qq, kk, vv

    def fwd():
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(*inputs(), is_causal=True, enable_gqa=gqa)

    # Whether SDPA's own dispatch would take this backend for these tensors (the reason is warned).
    can_use = {"flash": torch.backends.cuda.can_use_flash_attention,
               "cudnn": torch.backends.cuda.can_use_cudnn_attention,
               "efficient": torch.backends.cuda.can_use_efficient_attention}[backend]
    accepted = bool(can_use(torch.backends.cuda.SDPAParams(*inputs(), None, 0.0, True, gqa), True))

    def fwd_bwd():
        fwd().backward(grad)

    flops_fwd = 2 * 2 * seq * seq * heads * dim / 2
    try:
        f_ms = time_us(fwd, repeats) / 1e3
        fb_ms = time_us(fwd_bwd, repeats) / 1e3
    except RuntimeError as e:  # a backend that does not take this shape or dtype
        return {"backend": backend, "layout": layout, "seq": seq, "accepted": accepted,
                "error": str(e).splitlines()[0]}
    return {"backend": backend, "layout": layout, "seq": seq, "accepted": accepted, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
            "fwd_tflops": flops_fwd / f_ms / 1e9, "fwd_bwd_tflops": 3.5 * flops_fwd / fb_ms / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--backends", default="flash,cudnn,efficient")
    p.add_argument("--layouts", default="bhsd", help=f"comma-separated: {', '.join(LAYOUTS)}")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    rows = [measure(b, int(s), a.heads, a.groups, a.dim, a.repeats, layout)
            for s in a.lengths.split(",") for layout in a.layouts.split(",") for b in a.backends.split(",")]
    for r in rows:
        print(r if "error" in r else f"{r['backend']:>9} {r['layout']:>13} seq {r['seq']:>7} accepted {r['accepted']!s:>5}: fwd {r['fwd_ms']:8.1f} ms "
              f"{r['fwd_tflops']:5.0f} TF/s, fwd+bwd {r['fwd_bwd_ms']:8.1f} ms {r['fwd_bwd_tflops']:5.0f} TF/s", flush=True)
    if not a.no_record:
        print(f"wrote {write_result(a.out, 'attention', invocation('bench.bench_attention', argv), rows, args=vars(a))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
