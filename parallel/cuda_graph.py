"""`train.cuda_graph`: each step's forward and backward replayed as one CUDA graph.

Eager, the host launches a step's kernels one Python op at a time through megatron-core, and
the GPU idles between them wherever the host falls behind.
megatron-core's FullCudaGraphWrapper captures the whole `forward_backward_func` (schedule,
loss, weight-gradient accumulation into the fp32 main grads, finalize_model_grads) on the
second step and replays it from then on; each step's micro batches are first copied into
static buffers. The optimizer step stays eager.

A graph replays fixed shapes and no host-side decisions, so it applies only where a step has
neither: CUDA, engine=megatron, rows of one shape (data.packing changes cu_seqlens every step),
no pipeline parallel, and no MoE layer on megatron's dispatcher (it copies the data-dependent
tokens per expert to the host); models/fused_moe.py's layer keeps every size fixed and the
counts on the device, so `train.moe_dispatch=fused` can be captured where its layers keep the
fused path (models/fused_moe.config_fallbacks; a layer that falls back to megatron's path under
capture raises). `auto` turns it on only for one process, and not with the optimizer offloaded to the host: that layout is picked
for models sized to the GPU's memory, and the capture's private memory pool needs the step's
activations a second time beside those the eager warm-up step left in the allocator's cache.
`true` also allows tp/dp and the offloaded optimizer.
"""
from __future__ import annotations

from typing import Any


def blockers(setting: str | bool, *, device_type: str, world_size: int, engine: str, moe_dispatch: str | None,
             packing: bool, pp: int, cpu_offload: bool = False, moe_fallbacks: list[str] = ()) -> list[str]:
    """Why a CUDA graph cannot capture this run's steps (empty: it can). `setting` is
    train.cuda_graph; `device_type` may be `auto` (a submit host validating a job for other
    machines): only `cpu` rules it out. `moe_dispatch`: train.moe_dispatch of a MoE model, None
    for a dense one; `moe_fallbacks`: why its fused layers would take megatron's path
    (models/fused_moe.config_fallbacks). `cpu_offload`: optim.cpu_offload."""
    why = []
    if device_type == "cpu":
        why.append("needs device=cuda")
    if engine != "megatron":
        why.append("needs parallel.engine=megatron")
    if moe_dispatch is not None and moe_dispatch != "fused":
        why.append("the model is a mixture of experts on megatron's dispatch, which copies token counts "
                   "to the host (train.moe_dispatch=fused does not)")
    if moe_dispatch == "fused" and moe_fallbacks:
        why.append("the MoE layers would run megatron's dispatch (" + ", ".join(moe_fallbacks) + ")")
    if packing:
        why.append("data.packing=true gives each step other document boundaries (cu_seqlens)")
    if pp > 1:
        why.append("pipeline parallel (pp>1) is not captured")
    if setting == "auto" and world_size > 1:
        why.append("auto uses it on one process only")
    if setting == "auto" and cpu_offload:
        why.append("auto leaves runs with optim.cpu_offload=true eager (the capture needs the step's "
                   "activations a second time)")
    return why


def resolve(setting: str | bool, **run: Any) -> bool:
    """train.cuda_graph (auto | true | false) for this run (`run`: blockers' keywords); `true` where
    it cannot apply is a config error raised by launcher.config.validate before any process group
    starts."""
    return setting is not False and not blockers(setting, **run)


def wrap(forward_backward: Any) -> Any:
    """megatron-core's full-iteration CUDA graph around a forward_backward_func: step 1 eager
    (warms up compiled kernels and cuBLAS), step 2 captured, every later step replayed."""
    import torch
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper

    class Wrapper(FullCudaGraphWrapper):
        def data_read(self, *args: Any, **kwargs: Any) -> Any:
            # megatron's loader copies the micro batches into the graph's static inputs on a side
            # stream that does not wait for the current one; the loop queues a step while the last
            # one still runs (launcher/loop.py), whose graph is still reading those inputs.
            self.static_loader.stream.wait_stream(torch.cuda.current_stream())
            return super().data_read(*args, **kwargs)

    return Wrapper(forward_backward, cuda_graph_warmup_steps=1)
