"""Pinned (page-locked) host memory of the offload layouts: exact block sizes, and the blocks
megatron-core's optimizer offload pins and then drops handed back.

torch's pinned host allocator rounds every block up to the next power of two and keeps freed
blocks cached for reuse. The offloaded optimizer's host buffers (gradients, DeepSpeed's
partitions) are allocated once and live for the whole run, so the rounding buys no reuse and
costs up to 2x their size. torch takes `pinned_max_round_threshold_mb` in PYTORCH_ALLOC_CONF
(no rounding above that size); the variable is read when the allocator first starts, so it is
set before CUDA starts.
"""
from __future__ import annotations

import os

import torch

EXACT_ABOVE_MB = 16  # blocks above this many MiB are pinned at their exact size
ROUND_KEY = "pinned_max_round_threshold_mb"


def exact_pinned_blocks() -> None:
    """Pin blocks above EXACT_ABOVE_MB at their exact size. Call before CUDA starts; a threshold the
    user set in PYTORCH_ALLOC_CONF (or the older PYTORCH_CUDA_ALLOC_CONF) wins."""
    name = "PYTORCH_CUDA_ALLOC_CONF" if "PYTORCH_CUDA_ALLOC_CONF" in os.environ and \
        "PYTORCH_ALLOC_CONF" not in os.environ else "PYTORCH_ALLOC_CONF"
    current = os.environ.get(name, "")
    if ROUND_KEY not in current:
        os.environ[name] = ",".join(s for s in (current, f"{ROUND_KEY}:{EXACT_ABOVE_MB}") if s)


def release_cached_pinned_blocks(device: torch.device) -> None:
    """Hand torch's cached, unused pinned blocks back to the system. megatron-core's optimizer offload
    (HybridDeviceOptimizer) pins a 16-bit host copy of each parameter, keeps only the fp32 copy it
    makes from it, and is built twice (by get_megatron_optimizer, then by the distributed optimizer):
    the dropped copies stay cached, ~2 bytes per parameter of host memory nothing uses."""
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    release = getattr(getattr(torch.accelerator, "memory", None), "empty_host_cache", None)
    if release is None:  # torch before the public name
        release = torch._C._host_emptyCache
    release()
