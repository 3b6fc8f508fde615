"""Kernel-level timing for the GPU microbenchmarks (bench_swiglu, bench_fp8): CUDA events around
many back-to-back calls, after a warm-up (Triton compiles, caches fill)."""
from __future__ import annotations

from typing import Callable

import torch


def time_us(fn: Callable[[], object], iters: int = 30) -> float:
    """Mean µs per call of `fn` over `iters` calls, after 5 untimed ones."""
    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / iters


def time_graphed_us(fn: Callable[[], object], iters: int = 30) -> float:
    """Mean µs per replay of `fn` captured as one CUDA graph, as training runs it: timed eagerly,
    a sequence of small kernels would measure the host's launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, .grad exists) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay, iters)
