"""Checkpoints: megatron-core dist_checkpointing (torch_dist), written where they cannot be lost.

Layout on disk:
    <checkpoint.dir>/iter_0000020/   a complete dist_checkpoint (model, optimizer, scheduler, step, RNG)
    <checkpoint.dir>/latest          the name of the newest complete iter_* directory

A save goes to `iter_*.tmp`, is renamed only after every rank finished writing (fsync'd), and
`latest` is replaced atomically after that: a save killed midway leaves the previous checkpoint
and `latest` intact. Old checkpoints are pruned (`keep_last`) only after the new one is complete.

Tensors are stored in the layout-independent form of dist_checkpointing (model and the
distributed optimizer's 'fully_reshardable' state), so a checkpoint loads into any TP/PP/DP/EP
layout. Non-tensor state is loaded with torch.load's weights_only default: no pickled code.
A model-only checkpoint (e.g. from `launcher.convert import_hf`) starts training at step 0.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from models.args import ModelArgs
from parallel.megatron_engine import MegatronEngine

LATEST = "latest"
_ITER = "iter_"
# In an iter_* directory written by parallel.engine=deepspeed (DeepSpeed's own ZeRO-3 files):
# {"format": "deepspeed_zero3", "step", "layout", "model_args"}.
ZERO_META = "shardforge_zero.json"


def iter_dir_name(step: int) -> str:
    return f"{_ITER}{step:07d}"


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint root (follow `latest`) or one iter_* directory -> the iter_* directory."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        return path / latest.read_text().strip()
    if (path / "metadata.json").is_file() or (path / ZERO_META).is_file():
        return path
    raise FileNotFoundError(f"checkpoint.load: {path} holds neither a '{LATEST}' file nor a dist checkpoint")


def check_compatible(path: str | os.PathLike, model: dict[str, Any]) -> None:
    """Before any process group: the checkpoint must hold this model's shape (names may differ)."""
    directory = resolve(path)
    zero = zero_meta(directory)
    saved = zero["model_args"] if zero else dist_checkpointing.load_common_state_dict(str(directory)).get("model_args")
    if saved is None:  # checkpoints from `launcher.convert` carry their shape in model.yaml instead
        return
    current = asdict(ModelArgs.from_config(model))  # with the defaults the yaml leaves out
    differ = [f"{k}: checkpoint {saved[k]} vs config {current.get(k)}" for k in saved
              if k != "name" and saved[k] != current.get(k)]
    if differ:
        raise ValueError(f"{directory} was saved from model={saved.get('name')}, not this model ({'; '.join(differ)})")


def zero_meta(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a DeepSpeed ZeRO-3 checkpoint directory; None for a dist_checkpointing one."""
    path = Path(directory) / ZERO_META
    return json.loads(path.read_text()) if path.is_file() else None


def check_engine(path: str | os.PathLike, engine: str, world_size: int, tp: int = 1) -> None:
    """Before any process group: can `engine` load this checkpoint? (engine=deepspeed also takes a
    megatron checkpoint's weights, for a fresh start from them.)"""
    directory = resolve(path)
    zero = zero_meta(directory)
    convert = f"python -m launcher.convert zero_to_megatron checkpoint={path} out=<dir>"
    if zero is not None and engine != "deepspeed":
        raise ValueError(f"{directory} is a DeepSpeed ZeRO-3 checkpoint: resume it with parallel.engine=deepspeed, "
                         f"or convert it first: {convert}")
    if zero is not None and (zero["layout"]["tp"], zero["layout"]["dp"]) != (tp, world_size // tp):
        saved = zero["layout"]
        raise ValueError(f"{directory} holds ZeRO-3 partitions of tp={saved['tp']} x dp={saved['dp']} ranks, this "
                         f"run is tp={tp} x dp={world_size // tp}: resume in the same layout, or convert it "
                         f"({convert}) and train that")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _layout() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size()}


def _saved_layout(common: dict[str, Any]) -> dict[str, int] | None:
    layout = common.get("layout")
    return None if layout is None else {"ep": 1, **layout}  # checkpoints from before `ep` was recorded


def _own_structure(request: Any, loaded: Any) -> Any:
    """`request`'s nesting and non-tensor values (this layout's), with the loaded tensors in its
    sharded leaves. dist_checkpointing.load merges the *saving* layout's non-tensor optimizer
    state (per chained optimizer: under ep>1 MoE there are two, dense and expert) into the result;
    this layout's optimizer must get its own structure back."""
    if isinstance(request, (ShardedBase, LocalNonpersistentObject)):
        return loaded
    if isinstance(request, dict):
        return {k: _own_structure(v, loaded.get(k) if isinstance(loaded, dict) else None) for k, v in request.items()}
    if isinstance(request, list):
        return [_own_structure(v, loaded[i] if isinstance(loaded, list) and i < len(loaded) else None)
                for i, v in enumerate(request)]
    return request


def _rng_state(is_loading: bool) -> ShardedObject:
    # One RNG state per rank (dropout streams differ per TP rank): sharded over (pp, tp, dp).
    # Graph-safe trackers (train.cuda_graph) hold torch.Generators: saved as state tensors, so a
    # checkpoint is the same whether or not the run used a CUDA graph.
    tracker = {k: v.get_state() if isinstance(v, torch.Generator) else v
               for k, v in get_cuda_rng_tracker().get_states().items()}
    state = {"cpu": torch.get_rng_state(), "tracker": tracker}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    layout = _layout()
    rank = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank())
    return ShardedObject("rng_state", None if is_loading else state, (layout["pp"], layout["tp"], layout["dp"]),
                         rank, replica_id=0)


def _set_rng_state(state: dict[str, Any]) -> None:
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


def save(engine: MegatronEngine, root: str | os.PathLike, step: int, keep_last: int | None = None) -> Path:
    root = Path(root)
    final = root / iter_dir_name(step)
    tmp = root / (iter_dir_name(step) + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        tmp.mkdir()
    dist.barrier()
    if hasattr(engine, "save_state"):  # DeepSpeed ZeRO-3: its own per-rank partition files
        engine.save_state(root, tmp.name, step)
        if dist.get_rank() == 0:
            meta = {"format": "deepspeed_zero3", "step": step, "layout": _layout(), "model_args": asdict(engine.args)}
            (tmp / ZERO_META).write_text(json.dumps(meta, indent=1))
    else:
        state = engine.sharded_state_dict()
        state.update(step=step, layout=_layout(), model_args=asdict(engine.args),
                     rng_state=_rng_state(is_loading=False))
        dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): replace only once the new one is whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_latest(root, final.name)
        if keep_last:
            _prune(root, keep=keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob(f"{_ITER}*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep]:
        shutil.rmtree(old)


def load(engine: MegatronEngine, path: str | os.PathLike) -> int:
    """Load a checkpoint into `engine` (any layout); returns the step to resume after.

    Model-only checkpoints load the weights and return 0 (fine-tuning starts fresh).
    """
    directory = resolve(path)
    if hasattr(engine, "load_state"):  # DeepSpeed ZeRO-3
        if zero_meta(directory) is not None:
            return engine.load_state(directory)
        engine.load_model_weights(directory)  # a megatron checkpoint: its weights, a fresh start
        return 0
    common = dist_checkpointing.load_common_state_dict(str(directory))
    if "step" not in common:
        # (the optimizer is left untouched: a never-stepped one cannot even describe its state)
        _load_model(engine, dist_checkpointing.load(engine.model_sharded_state_dict(), str(directory)))
        return 0
    for chained in engine.optimizer.chained_optimizers:
        # Without apex/TE the distributed optimizer's state_dict() asserts on a never-stepped
        # optimizer; give it states to overwrite.
        chained._init_optimizer_states_with_dummy_values()
    state = engine.sharded_state_dict(is_loading=True)
    # RNG streams are per rank: restore them only into the layout that saved them.
    same_layout = _saved_layout(common) == _layout()
    if same_layout:
        state["rng_state"] = _rng_state(is_loading=True)
    loaded = dist_checkpointing.load(state, str(directory))
    _load_model(engine, loaded)
    # Non-tensor optimizer state (param groups: lr, wd, ... which the scheduler sets again every
    # step) is this layout's own; tensors (main params, Adam moments) come from the checkpoint.
    optimizer_state = loaded["optimizer"] if same_layout else _own_structure(state["optimizer"], loaded["optimizer"])
    # fp32 main params are views of the model params; the in-place copy must not record grads.
    with torch.no_grad():
        engine.optimizer.load_state_dict(optimizer_state)
    step = int(common["step"])
    # torch AdamW's per-param `step` counter is not restored by megatron without apex/TE
    # (it comes back as one shared dummy tensor): set it from our own step count.
    for chained in engine.optimizer.chained_optimizers:
        fused = chained.optimizer.defaults.get("fused")  # the fused kernel keeps `step` on the device
        for param, param_state in chained.optimizer.state.items():
            param_state["step"] = torch.tensor(float(step), device=param.device if fused else "cpu")
    engine.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    elif dist.get_rank() == 0:
        print(f"checkpoint: layout changed {_saved_layout(common)} -> {_layout()}: weights and optimizer state "
              f"resharded, RNG streams start fresh", flush=True)
    return step


def _chunk_index(key: str) -> int | None:
    """'model' -> 0, 'model3' -> 3 (virtual pipeline chunks), anything else -> None."""
    if key == "model":
        return 0
    return int(key[5:]) if key.startswith("model") and key[5:].isdigit() else None


def _load_model(engine: MegatronEngine, loaded: dict[str, Any]) -> None:
    for key, value in loaded.items():
        index = _chunk_index(key)
        if index is not None:
            engine.chunks[index].module.load_state_dict(value)
