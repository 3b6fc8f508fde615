"""fp8 against bf16 for the transformer layer's GEMMs at the dense bench shape.

    python -m bench.bench_fp8 [--rows 8192]

For each linear of a llama_1b_32k layer (qkv, proj, fc1, fc2) and each of its three GEMMs
(forward, input grad, weight grad), prints the bf16 `torch.matmul` time and the fp8
`torch._scaled_mm` time (tensorwise scales; e4m3 inputs and weights, e5m2 output grads), each
cast of the fp8 linear (models/kernels/fp8_linear.py: amax, then both layouts in one pass) with
its HBM rate, and the whole fp8 linear forward + backward. The casts and the whole linear are
timed as CUDA-graph replays, as training runs them (eager, the host's launches would be timed).
Each printed line is also a row of the JSON result (bench/results_io.py; `--out`, default under
bench/results/). GPU with fp8 (sm89+) only.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.cuda_timing import time_graphed_us, time_us
from bench.results_io import invocation, write_result
from models.kernels import fp8_linear

SHAPES = {"qkv": (2048, 4096), "proj": (2048, 2048), "fc1": (2048, 16384), "fc2": (8192, 2048)}


def _cast_row(linear: str, tensor: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    t_us = time_graphed_us(lambda: fp8_linear.cast_to_fp8(t, dtype, fp8_linear.amax(t), colwise=True))
    moved = t.numel() * (2 + 2 + 2)  # amax read, cast read, two fp8 writes
    row = {"kind": "cast", "linear": linear, "tensor": tensor, "shape": list(t.shape), "us": t_us,
           "gb_per_s": moved / t_us / 1e3}
    print(f"{linear + ' ' + tensor:14s} cast {tuple(t.shape)} both layouts {t_us:8.1f} us {row['gb_per_s']:6.0f} GB/s",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_fp8.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    a = p.parse_args(argv)
    m = a.rows
    rows: list[dict[str, Any]] = []
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    one = torch.ones((), device="cuda")
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    totals = {"bf16": 0.0, "fp8": 0.0, "fp8 fast": 0.0, "fp8 layer": 0.0}
    print(f"{'GEMM':14s} {'bf16 us':>9s} {'TF/s':>6s} {'fp8 us':>9s} {'TF/s':>6s} {'fast us':>9s} {'TF/s':>6s}")
    for name, (k, n) in SHAPES.items():
        x, w, dy = torch.randn(m, k, **bf16), torch.randn(n, k, **bf16), torch.randn(m, n, **bf16)
        x8, w8, dy8 = x.to(e4), w.to(e4), dy.to(e5)
        w8_t, dy8_t, x8_t = w8.t().contiguous(), dy8.t().contiguous(), x8.t().contiguous()
        gemms = {  # name: (bf16 fn, fp8 fn(fast_accum))
            "fwd": (lambda: x @ w.t(), lambda f: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16,
                                                                   use_fast_accum=f)),
            "dgrad": (lambda: dy @ w, lambda f: torch._scaled_mm(dy8, w8_t.t(), one, one, out_dtype=torch.bfloat16,
                                                                 use_fast_accum=f)),
            "wgrad": (lambda: dy.t() @ x, lambda f: torch._scaled_mm(dy8_t, x8_t.t(), one, one,
                                                                     out_dtype=torch.bfloat16, use_fast_accum=f)),
        }
        flops = 2 * m * k * n
        for g, (ref, fp8) in gemms.items():
            t_ref, t8, t8f = time_us(ref), time_us(lambda: fp8(False)), time_us(lambda: fp8(True))
            totals["bf16"] += t_ref
            totals["fp8"] += t8
            totals["fp8 fast"] += t8f
            rows.append({"kind": "gemm", "linear": name, "gemm": g, "m": m, "k": k, "n": n, "bf16_us": t_ref,
                         "fp8_us": t8, "fp8_fast_accum_us": t8f, "flops": flops})
            print(f"{name + ' ' + g:14s} {t_ref:9.1f} {flops / t_ref / 1e6:6.0f} {t8:9.1f} {flops / t8 / 1e6:6.0f} "
                  f"{t8f:9.1f} {flops / t8f / 1e6:6.0f}", flush=True)
        # the whole fp8 linear, casts included, forward + backward
        xr = x.detach().requires_grad_()
        wr = w.detach().requires_grad_()

        def layer() -> None:
            fp8_linear.fp8_linear(xr, wr).backward(dy)

        rows.append(_cast_row(name, "x", x, e4))
        rows.append(_cast_row(name, "dy", dy, e5))
        t_layer = time_graphed_us(layer)
        totals["fp8 layer"] += t_layer
        rows.append({"kind": "fp8 linear fwd+bwd", "linear": name, "us": t_layer})
        print(f"{name + ' fp8 linear':14s} fwd+bwd with casts {t_layer:9.1f} us", flush=True)
    print("per layer, us: " + ", ".join(f"{k} {v:.0f}" for k, v in totals.items()))
    rows.append({"kind": "per layer total", **{f"{k.replace(' ', '_')}_us": v for k, v in totals.items()}})
    if not a.no_record:
        print(f"wrote {write_result(a.out, 'fp8', invocation('bench.bench_fp8', argv), rows, args=vars(a))}")


if __name__ == "__main__":
    main()
