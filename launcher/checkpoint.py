"""Checkpoint directories, written where they cannot be lost.

Layout on disk:
    <root>/iter_0000020/   one complete checkpoint, whatever wrote it (an engine's `save`, an HF
                           import, a ZeRO-3 conversion)
    <root>/latest          the name of the newest complete iter_* directory

Every writer goes through `writing`: the content goes to `iter_*.tmp`, which is fsync'd and
renamed only once every rank finished writing, and `latest` is replaced atomically after that:
a writer killed midway leaves the previous checkpoint and `latest` intact. Old checkpoints are
pruned (`keep_last`) only after the new one is complete.

What is inside a directory is the engine's business (parallel.engine.Engine.save / load), plus the
files a writer hands over (`files=`: e.g. the model shape and the tokenizer, launcher.checkpoint_files),
written into the same temporary directory and published with it: this module names, creates,
publishes, finds and prunes directories, and checks before any process group starts that a
checkpoint fits the run.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Union

import torch.distributed as dist

from models.args import ModelArgs

if TYPE_CHECKING:
    from parallel.engine import Engine

LATEST = "latest"
_ITER = "iter_"
# A file to place in a checkpoint directory: its content, or a file to copy.
FileSource = Union[bytes, str, os.PathLike]


def iter_dir_name(step: int) -> str:
    return f"{_ITER}{step:07d}"


def root_of(directory: Path) -> Path:
    """The directory holding `latest` (the parent of an iter_* directory)."""
    return directory.parent if directory.name.startswith(_ITER) else directory


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint root (follow `latest`) or one iter_* directory -> the iter_* directory."""
    from parallel.deepspeed_engine import ZERO_META

    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        return path / latest.read_text().strip()
    if (path / "metadata.json").is_file() or (path / ZERO_META).is_file():
        return path
    raise FileNotFoundError(f"{path} holds neither a '{LATEST}' file nor a dist checkpoint")


def check_compatible(path: str | os.PathLike, model: dict[str, Any]) -> None:
    """Before any process group: the checkpoint must hold this model's shape (names may differ)."""
    from megatron.core import dist_checkpointing

    from parallel.deepspeed_engine import zero_meta

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


def check_live_reference(path: str | os.PathLike) -> None:
    """Before any process group: a dpo.reference=live run resuming this checkpoint needs the frozen
    reference its run saved in it (either engine's format)."""
    from megatron.core import dist_checkpointing

    from parallel.deepspeed_engine import REFERENCE_FILE, zero_meta
    from parallel.megatron_engine import LIVE_REFERENCE

    directory = resolve(path)
    if zero_meta(directory) is not None:
        saved = (directory / REFERENCE_FILE.format(rank=0)).is_file()
    else:
        saved = bool(dist_checkpointing.load_common_state_dict(str(directory)).get(LIVE_REFERENCE))
    if not saved:
        raise ValueError(f"{directory} holds no live DPO reference (it was saved with another dpo.reference): "
                         f"resume it with that one")


def check_engine(path: str | os.PathLike, engine: str, world_size: int, tp: int = 1) -> None:
    """Before any process group: can `engine` load this checkpoint? (engine=deepspeed also takes a
    megatron checkpoint's weights, for a fresh start from them.)"""
    from parallel.deepspeed_engine import zero_meta

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


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob(f"{_ITER}*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep]:
        shutil.rmtree(old)


def _write_files(directory: Path, files: Mapping[str, FileSource]) -> None:
    for name, source in files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_writer() -> bool:
    """Rank 0 (or the only process) creates, publishes and prunes directories."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextmanager
def writing(root: str | os.PathLike, step: int, keep_last: int | None = None,
            files: Mapping[str, FileSource] | None = None) -> Iterator[Path]:
    """Write the checkpoint of `step` under `root`: yields an empty directory to fill (every rank,
    when a process group exists); once the block ends without an error, adds `files` (relative
    name -> content or a file to copy) and publishes it as <root>/iter_<step> and `latest`, then
    prunes to `keep_last`. Files a writer adds to `root` itself inside the block are in place
    before `latest` names the new checkpoint."""
    root = Path(root)
    final = root / iter_dir_name(step)
    tmp = root / (iter_dir_name(step) + ".tmp")
    if _is_writer():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        tmp.mkdir()
    _barrier()
    yield tmp
    _barrier()
    if _is_writer():
        _write_files(tmp, files or {})
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): replace only once the new one is whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_latest(root, final.name)
        if keep_last:
            _prune(root, keep=keep_last)
    _barrier()


def save(engine: Engine, root: str | os.PathLike, step: int, keep_last: int | None = None,
         files: Mapping[str, FileSource] | None = None) -> Path:
    """The engine's full state after `step` optimizer steps, and `files` (see `writing`), as
    <root>/iter_<step>; returns it."""
    with writing(root, step, keep_last, files) as directory:
        engine.save(directory, step)
    return Path(root) / iter_dir_name(step)


def load(engine: Engine, path: str | os.PathLike) -> int:
    """Load a checkpoint root (its `latest`) or one iter_* directory into `engine`; returns the
    step to resume after (0 for model-only checkpoints: fine-tuning starts fresh)."""
    return engine.load(resolve(path))
