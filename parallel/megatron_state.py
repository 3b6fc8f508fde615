"""The megatron engine's checkpoint format: megatron-core dist_checkpointing (torch_dist).

A training checkpoint holds the model, the distributed optimizer's 'fully_reshardable' state,
the scheduler, the step, the layout and model shape that saved it and every rank's RNG streams;
a model-only checkpoint (an HF import, a ZeRO-3 conversion) holds the model and its shape. Both
store tensors in the layout-independent form of dist_checkpointing, so they load into any
TP/PP/DP/EP layout. Non-tensor state is loaded with torch.load's weights_only default: no
pickled code.

The functions here read and write inside a directory someone else created (launcher/checkpoint.py
for training saves and conversions); they never name, rename or prune directories.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedBase, ShardedObject,
                                                      is_main_replica)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from models.init import local_tensors


def layout() -> dict[str, int]:
    """This process's megatron-core layout, as checkpoints record it."""
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size()}


def saved_layout(common: dict[str, Any]) -> dict[str, int] | None:
    saved = common.get("layout")
    return None if saved is None else {"ep": 1, "cp": 1, **saved}  # checkpoints from before `ep`/`cp` were recorded


def own_structure(request: Any, loaded: Any) -> Any:
    """`request`'s nesting and non-tensor values (this layout's), with the loaded tensors in its
    sharded leaves. dist_checkpointing.load merges the *saving* layout's non-tensor optimizer
    state (per chained optimizer: under ep>1 MoE there are two, dense and expert) into the result;
    this layout's optimizer must get its own structure back."""
    if isinstance(request, (ShardedBase, LocalNonpersistentObject)):
        return loaded
    if isinstance(request, dict):
        return {k: own_structure(v, loaded.get(k) if isinstance(loaded, dict) else None) for k, v in request.items()}
    if isinstance(request, list):
        return [own_structure(v, loaded[i] if isinstance(loaded, list) and i < len(loaded) else None)
                for i, v in enumerate(request)]
    return request


def rng_state(is_loading: bool) -> ShardedObject:
    # One RNG state per rank (dropout streams differ per TP rank): sharded over (pp, tp, dp x cp).
    # Graph-safe trackers (train.cuda_graph) hold torch.Generators: saved as state tensors, so a
    # checkpoint is the same whether or not the run used a CUDA graph.
    tracker = {k: v.get_state() if isinstance(v, torch.Generator) else v
               for k, v in get_cuda_rng_tracker().get_states().items()}
    state = {"cpu": torch.get_rng_state(), "tracker": tracker}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    current = layout()
    rank = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True))
    return ShardedObject("rng_state", None if is_loading else state,
                         (current["pp"], current["tp"], current["dp"] * current["cp"]), rank, replica_id=0)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    current = get_cuda_rng_tracker().get_states()
    for name, saved in state["tracker"].items():
        if isinstance(current.get(name), torch.Generator):
            current[name].set_state(saved)  # a graph-safe tracker keeps its Generator objects
        else:
            current[name] = saved
    get_cuda_rng_tracker().set_states(current)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_model(model: torch.nn.Module, model_args: dict[str, Any], directory: Path) -> None:
    """A model-only checkpoint of one whole-model chunk into `directory`; `model_args` (the shape,
    as a plain dict) is the same common-state entry training checkpoints carry."""
    dist_checkpointing.save({"model": model.sharded_state_dict(), "model_args": model_args}, str(directory))


def load_model(model: torch.nn.Module, directory: Path) -> None:
    """A checkpoint's model tensors into one whole-model chunk (resharded to its layout; any
    optimizer state in the checkpoint is not read)."""
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    model.load_state_dict(loaded["model"])


@torch.no_grad()
def gather_full(pieces: list[tuple[Any, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole tensors from every rank's main-replica slices, on every rank (collective).

    `pieces`: (ShardedTensor metadata, this rank's values of that slice). The global tensors are
    assembled on the CPU: each element is written by exactly one rank and summed with zeros
    elsewhere, so the result is exact in any dtype."""
    shapes = {sh.key: (tuple(sh.global_shape), sh.dtype) for sh, _ in pieces}
    everyone: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, shapes)  # pipeline stages hold different keys
    for other in everyone:
        shapes.update(other)
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    by_key: dict[str, list[tuple[Any, torch.Tensor]]] = {}
    for sh, values in pieces:
        if is_main_replica(sh.replica_id):
            by_key.setdefault(sh.key, []).append((sh, values))
    full: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        buffer = torch.zeros(shape, dtype=torch.float32, device=backend_device)
        for sh, values in by_key.get(key, []):
            index = tuple(slice(o, o + n) for o, n in
                          zip(sh.global_offset, (1,) * sh.prepend_axis_num + tuple(sh.local_shape)))
            buffer[index] = values.reshape(buffer[index].shape).to(buffer)
        dist.all_reduce(buffer)
        full[key] = buffer.to("cpu", dtype)
    return full


def model_pieces(chunks: list[torch.nn.Module]) -> list[tuple[Any, torch.Tensor]]:
    """(ShardedTensor, its local values) of every model chunk of this rank."""
    return [(sh, sh.data.detach()) for chunk in chunks for sh in local_tensors(chunk)]
