"""A run directory's results, kept safe across runs: what a run.dir already holds, moving a previous
run aside (`run.overwrite=true`), metrics.jsonl cut back to a resumed step, and the run's wandb id.

A run directory belongs to one run. Resuming continues it (same metrics.jsonl, same wandb run); a
fresh start into a directory that holds a run is refused before training (launcher/config/validate.py)
unless the previous run is moved aside here first. Nothing here deletes results: files are replaced
through a temporary file and a rename, directories are renamed.
"""
from __future__ import annotations

import datetime
import json
import os
import secrets
import string
from pathlib import Path

METRICS = "metrics.jsonl"
WANDB_RUN_ID = "wandb_run_id"
# What describes the launch that is starting, not a previous run's results: Hydra's record of this
# run's config (written before the run starts) and a Slurm job's script and log (open while it runs).
_LAUNCH_FILES = (".hydra",)
_LAUNCH_PATTERNS = ("slurm-*.out", "*.sbatch")


def metrics_steps(run_dir: str | os.PathLike) -> int:
    """The highest step recorded in <run_dir>/metrics.jsonl (0 when there is none)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def checkpoint_step(ckpt_dir: str | os.PathLike) -> int | None:
    """The step of the checkpoint `latest` names in `ckpt_dir` (None when it has no `latest`)."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return 0


def previous_run(run_dir: str | os.PathLike, ckpt_dir: str | os.PathLike) -> int | None:
    """The steps of the run `run_dir` (and its `ckpt_dir`) already holds; None when it holds none:
    no metrics.jsonl with a record and no checkpoint."""
    metrics = Path(run_dir) / METRICS
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    saved = checkpoint_step(ckpt_dir)
    if not has_metrics and saved is None:
        return None
    return max(metrics_steps(run_dir), saved or 0)


def _is_launch_file(path: Path) -> bool:
    return path.name in _LAUNCH_FILES or any(path.match(p) for p in _LAUNCH_PATTERNS)


def move_aside(run_dir: str | os.PathLike, ckpt_dir: str | os.PathLike) -> Path:
    """Move the previous run's results out of `run_dir` into <run_dir>.<timestamp> (and `ckpt_dir`,
    when it lies outside run_dir, to <ckpt_dir>.<timestamp>); returns the new home of the results."""
    run_dir, ckpt_dir = Path(run_dir), Path(ckpt_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = _free_name(Path(f"{run_dir}.{stamp}"))
    aside.mkdir(parents=True)
    if run_dir.is_dir():
        for entry in sorted(run_dir.iterdir()):
            if not _is_launch_file(entry):
                os.rename(entry, aside / entry.name)
    inside = ckpt_dir.resolve().is_relative_to(run_dir.resolve())
    if not inside and ckpt_dir.exists():
        os.rename(ckpt_dir, _free_name(Path(f"{ckpt_dir}.{stamp}")))
    return aside


def _free_name(path: Path) -> Path:
    """`path`, or `path`-2, -3 ... when it is taken (two moves within one second)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trim_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Drop the records after `step` from <run_dir>/metrics.jsonl (steps a resumed run trains again);
    returns how many were dropped. The file is replaced whole, never left half-written."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        _replace(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def wandb_run_id(run_dir: str | os.PathLike, resuming: bool) -> str:
    """The wandb run id of this run: the one kept in <run_dir>/wandb_run_id when resuming (a resumed
    or requeued job continues the same wandb run), else a new one, written there."""
    path = Path(run_dir) / WANDB_RUN_ID
    if resuming and path.is_file() and (kept := path.read_text().strip()):
        return kept
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's form
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, run_id + "\n")
    return run_id
