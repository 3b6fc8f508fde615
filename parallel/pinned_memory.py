"""Pinned (page-locked) host memory of the offload layouts: exact block sizes, and the blocks
megatron-core's optimizer offload pins and then drops handed back.

torch's pinned host allocator rounds every block up to the next power of two and keeps freed
blocks cached for reuse. The offloaded optimizer's host buffers (gradients, DeepSpeed's
partitions) are allocated once and live for the whole run, so the rounding buys no reuse and
costs up to 2x their size. torch's allocator setting `pinned_max_round_threshold_mb` turns the
rounding off above a size; a torch without it keeps its rounding.
"""
from __future__ import annotations

import torch

EXACT_ABOVE_MB = 16  # blocks above this many MiB are pinned at their exact size
ROUND_KEY = "pinned_max_round_threshold_mb"


def exact_pinned_blocks() -> bool:
    """Pin blocks above EXACT_ABOVE_MB at their exact size from now on, unless the user set a threshold
    (PYTORCH_ALLOC_CONF). Whether the setting is in force: False on a torch that lacks it."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    put = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # (torch's own replacement for
    if get is None or put is None:                                        # torch.cuda._set_allocator_settings)
        return False
    current = get()  # the settings in force (PYTORCH_ALLOC_CONF's at start)
    if ROUND_KEY in current:
        return True
    try:  # with the current settings: a new string resets the keys it leaves out
        put(",".join(s for s in (current, f"{ROUND_KEY}:{EXACT_ABOVE_MB}") if s))
    except RuntimeError:  # a torch whose allocator does not know the key
        return False
    return ROUND_KEY in get()


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
