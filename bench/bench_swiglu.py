"""HBM bandwidth of the SwiGLU kernels at the dense bench shape, per launch configuration.

    python -m bench.bench_swiglu [--rows 8192] [--ffn 8192]

Prints µs and GB/s for: a plain copy of the fc1 output (the bandwidth reference), megatron's
compiled forward, and the Triton forward/backward at each (BLOCK, num_warps), and writes the same
rows as one JSON result (bench/results_io.py; `--out`, default under bench/results/). GPU only.
"""
from __future__ import annotations

import argparse

import torch
import triton

from bench.cuda_timing import time_us
from bench.results_io import invocation, write_result
from models.kernels import swiglu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_swiglu.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    a = p.parse_args(argv)
    rows, ffn = a.rows, a.ffn
    y = torch.randn(rows, 2 * ffn, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(rows, ffn, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(g)
    dy = torch.empty_like(y)
    fwd_bytes, bwd_bytes = 3 * g.numel() * 2, 5 * g.numel() * 2
    results: list[dict] = []

    def report(name: str, fn, nbytes: int) -> None:
        us = time_us(fn, iters=50)
        results.append({"kernel": name, "us": us, "bytes": nbytes, "gb_per_s": nbytes / us / 1e3})
        print(f"{name:40s} {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s", flush=True)

    report("copy of y (reference)", lambda: dy.copy_(y), 2 * y.numel() * 2)
    from megatron.core.fusions.fused_bias_swiglu import swiglu as megatron_swiglu
    report("megatron compiled forward", lambda: megatron_swiglu(y), fwd_bytes)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            grid = (rows, triton.cdiv(ffn, block))
            report(f"triton forward  BLOCK={block} warps={warps}",
                   lambda: swiglu._swiglu_kernel[grid](y, out, ffn, BLOCK=block, num_warps=warps), fwd_bytes)
            report(f"triton backward BLOCK={block} warps={warps}",
                   lambda: swiglu._swiglu_back_kernel[grid](g, y, dy, ffn, BLOCK=block, num_warps=warps),
                   bwd_bytes)
    if not a.no_record:
        print(f"wrote {write_result(a.out, 'swiglu', invocation('bench.bench_swiglu', argv), results, args=vars(a))}")


if __name__ == "__main__":
    main()
