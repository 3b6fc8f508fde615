"""A LoRA checkpoint: the adapters (and their optimizer state) only, and a reference to their base.

The engine saves `lora.json` beside the adapters' dist checkpoint: the base checkpoint the run
started from (its iter_* directory, or null for the seed's initial weights, with that seed and
dtype), the base model's shape and the adapters' rank, alpha, dropout, targets and whether they
trained against a base held in fp8 (`base_fp8`). Resuming loads the base from there,
then the adapters; `launcher.convert merge_lora` / `export_hf peft=true`, `launcher.generate` and
`launcher.evaluate` read the same file.

The base is stored twice: `base`, relative to the checkpoint directory, and `base_absolute`, where
it was at save time. A run dir moved or copied together with its base (an experiment tree
archived whole) finds it by the relative path; a run dir moved alone, by the absolute one.
`read_reference` resolves the two (the relative one first) to one absolute path; files that store
only an absolute `base` read the same way.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from models.args import ModelArgs
from models.lora import LoraOptions

REFERENCE = "lora.json"


def reference(base: str | None, directory: Path, seed: int, lora: LoraOptions, args: ModelArgs,
              dtype: torch.dtype) -> dict[str, Any]:
    """`base`: the base's iter_* directory (None: the seed's initial weights); `directory`: the
    checkpoint directory being written (launcher/checkpoint.py's temporary sibling of the published
    one, so the relative path is the same); `dtype`: the training parameters' (a seed's initial
    weights are drawn in it)."""
    absolute = None if base is None else str(Path(base).resolve())
    relative = None if absolute is None else os.path.relpath(absolute, Path(directory).resolve())
    return {"base": relative, "base_absolute": absolute, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
            "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
            "base_fp8": lora.base_fp8, "base_model": asdict(args)}


def write_reference(directory: Path, content: dict[str, Any]) -> None:
    """Into a checkpoint directory being written (launcher/checkpoint.py publishes it whole)."""
    (directory / REFERENCE).write_text(json.dumps(content, indent=2))


def read_reference(directory: str | Path) -> dict[str, Any] | None:
    """The reference of a LoRA checkpoint's iter_* directory, its `base` an absolute path (or None:
    the seed's initial weights); None for any other checkpoint."""
    path = Path(directory) / REFERENCE
    if not path.is_file():
        return None
    content = json.loads(path.read_text())
    if content["base"] is not None:
        # (joined to an absolute `base`, the directory drops out)
        candidates = [Path(directory).resolve() / content["base"], content.get("base_absolute")]
        found = next((Path(c) for c in candidates if c is not None and Path(c).is_dir()), candidates[0])
        content["base"] = str(found.resolve())
    return content


def missing_base(content: dict[str, Any]) -> str | None:
    """Why the base a reference (from `read_reference`) names cannot be loaded; None when it can, or
    when the base is the seed's initial weights."""
    base, saved = content["base"], content.get("base_absolute")
    if base is None or Path(base).is_dir():
        return None
    where = f"{base} (relative to the checkpoint) nor {saved} (where it was saved)" if saved and saved != base else base
    return f"the base checkpoint of its adapters is missing: not at {where}"


def options(content: dict[str, Any]) -> LoraOptions:
    return LoraOptions(rank=content["rank"], alpha=content["alpha"], dropout=content["dropout"],
                       targets=tuple(content["targets"]), base_fp8=content["base_fp8"])
