"""Pinned (page-locked) host memory of the offload layouts: the blocks megatron-core's optimizer
offload pins and then drops, handed back.

torch's pinned host allocator keeps freed blocks cached for reuse (each rounded up to a power of
two). The offload layouts' host buffers are allocated once and live for the whole run; copies
dropped while they are set up would stay cached, holding host memory nothing uses.
"""
from __future__ import annotations

import torch


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
