"""Host memory of a training process by component, pinned and pageable apart.

Counted from the tensors themselves (each storage once, its exact size): the optimizer's state in
host memory (fp32 masters, Adam moments, host-side gradients: megatron-core's offloaded optimizer,
or DeepSpeed's CPU Adam with ZeRO-3's fp32 partitions and gradient buffer), parameter partitions
DeepSpeed keeps in host memory (`ds_tensor`), and the other host tensors DeepSpeed's ZeRO
optimizer holds (its flat buffers). Beside them: torch's
pinned host allocator's pool (its blocks rounded up to powers of two, so it can exceed the pinned
bytes counted above) and the process's resident set, which holds everything.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import psutil
import torch

GiB = 2**30


def _optimizer_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """Params, grads and state of a torch optimizer (of each sub-optimizer of a hybrid one)."""
    for inner in getattr(optimizer, "sub_optimizers", None) or [optimizer]:
        for group in inner.param_groups:
            for param in group["params"]:
                yield param
                if param.grad is not None:
                    yield param.grad
        for state in inner.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))
    yield from getattr(optimizer, "cpu_copy_map_grad", {}).values()


# DeepSpeed ZeRO-3's fp32 master partitions and its host gradient buffer: optimizer state, as the
# masters and host gradient copies of megatron's offloaded optimizer are (its CPU Adam holds them
# in its param groups only during a step).
DEEPSPEED_STATE = ("fp32_partitioned_groups_flat", "grad_partitions_flat_buffer")


def _attribute_tensors(obj: Any, names: tuple[str, ...] | None = None) -> Iterator[torch.Tensor]:
    """Tensors an object holds in its attributes (those of `names`, or all), directly or in lists / tuples."""
    for name, value in vars(obj).items():
        if names is not None and name not in names:
            continue
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if torch.is_tensor(v))


def _add(tensors: Iterable[torch.Tensor | None], seen: set[int], pinned_ok: bool) -> tuple[int, int]:
    """(pinned, pageable) bytes of the host storages among `tensors` not counted yet."""
    pinned = pageable = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        if pinned_ok and t.is_pinned():
            pinned += storage.nbytes()
        else:
            pageable += storage.nbytes()
    return pinned, pageable


def host_memory(optimizer: Any, params: Iterable[torch.nn.Parameter]) -> dict[str, float]:
    """GiB by component, for the metrics record: `optimizer` is the engine's (megatron's
    MegatronOptimizer or DeepSpeed's ZeRO optimizer), `params` the model's parameters."""
    pinned_ok = torch.cuda.is_available()
    seen: set[int] = set()
    inners = ([c.optimizer for c in optimizer.chained_optimizers] if hasattr(optimizer, "chained_optimizers")
              else [getattr(optimizer, "optimizer", optimizer)])
    parts = {
        "state": _add((*(t for o in inners if o is not None for t in _optimizer_tensors(o)),
                       *_attribute_tensors(optimizer, DEEPSPEED_STATE)), seen, pinned_ok),
        "params": _add((getattr(p, "ds_tensor", p) for p in params), seen, pinned_ok),
        "buffers": _add(_attribute_tensors(optimizer), seen, pinned_ok),
    }
    out = {"host_rss_gb": psutil.Process().memory_info().rss / GiB}
    for name, (pinned, pageable) in parts.items():
        out[f"host_{name}_pinned_gb"], out[f"host_{name}_pageable_gb"] = pinned / GiB, pageable / GiB
    if pinned_ok and torch.cuda.is_initialized():
        stats = torch.cuda.host_memory_stats()
        out["host_pinned_pool_gb"] = stats.get("allocated_bytes.current", 0) / GiB
    return out
