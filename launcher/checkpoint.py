"""Checkpoints: megatron-core dist_checkpointing (torch_dist), written where they cannot be lost.

Layout on disk:
    <checkpoint.dir>/iter_0000020/   a complete dist_checkpoint (model, optimizer, scheduler, step)
    <checkpoint.dir>/latest          the name of the newest complete iter_* directory

A save goes to `iter_*.tmp`, is renamed only after every rank finished writing, and `latest`
is replaced atomically after that: a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from parallel.megatron_engine import MegatronEngine

LATEST = "latest"


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint root (follow `latest`) or one iter_* directory -> the iter_* directory."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        return path / latest.read_text().strip()
    if (path / "metadata.json").is_file():
        return path
    raise FileNotFoundError(f"checkpoint.load: {path} holds neither a '{LATEST}' file nor a dist checkpoint")


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine: MegatronEngine, root: str | os.PathLike, step: int) -> Path:
    root = Path(root)
    final = root / iter_dir_name(step)
    tmp = root / (iter_dir_name(step) + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        tmp.mkdir()
    dist.barrier()
    state = engine.sharded_state_dict()
    state["step"] = step
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # re-saving a step (e.g. after resume): replace only once the new one is whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_write(root / LATEST, final.name + "\n")
    dist.barrier()
    return final


def load(engine: MegatronEngine, path: str | os.PathLike) -> int:
    """Load model, optimizer and scheduler into `engine`; returns the step to resume after."""
    directory = resolve(path)
    for chained in engine.optimizer.chained_optimizers:
        # Without apex/TE the distributed optimizer's state_dict() asserts on a never-stepped
        # optimizer; give it states to overwrite.
        chained._init_optimizer_states_with_dummy_values()
    state = engine.sharded_state_dict(is_loading=True)
    state["step"] = 0
    loaded = dist_checkpointing.load(state, str(directory))
    for key in [k for k in loaded if k.startswith("model")]:
        index = 0 if key == "model" else int(key[len("model"):])
        engine.chunks[index].module.load_state_dict(loaded[key])
    # fp32 main params are views of the model params; the in-place copy must not record grads.
    with torch.no_grad():
        engine.optimizer.load_state_dict(loaded["optimizer"])
    step = int(loaded["step"])
    # torch AdamW's per-param `step` counter is not restored by megatron without apex/TE
    # (it comes back as one shared dummy tensor): set it from our own step count.
    for chained in engine.optimizer.chained_optimizers:
        for param_state in chained.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step))
    engine.scheduler.load_state_dict(loaded["scheduler"])
    return step
