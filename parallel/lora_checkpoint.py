"""A LoRA checkpoint: the adapters (and their optimizer state) only, and a reference to their base.

The engine saves `lora.json` beside the adapters' dist checkpoint: the base checkpoint the run
started from (its iter_* directory, or null for the seed's initial weights, with that seed and
dtype), the base model's shape and the adapters' rank, alpha, dropout, targets and whether they
trained against a base held in fp8 (`base_fp8`). Resuming loads the base from there,
then the adapters; `launcher.convert merge_lora` / `export_hf peft=true` read the same file.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from models.args import ModelArgs
from models.lora import LoraOptions

REFERENCE = "lora.json"


def reference(base: str | None, seed: int, lora: LoraOptions, args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    """`dtype`: the training parameters' (a seed's initial weights are drawn in it)."""
    return {"base": base, "seed": seed, "dtype": str(dtype).removeprefix("torch."), "rank": lora.rank,
            "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets), "base_fp8": lora.base_fp8,
            "base_model": asdict(args)}


def write_reference(directory: Path, content: dict[str, Any]) -> None:
    """Into a checkpoint directory being written (launcher/checkpoint.py publishes it whole)."""
    (directory / REFERENCE).write_text(json.dumps(content, indent=2))


def read_reference(directory: str | Path) -> dict[str, Any] | None:
    """The reference of a LoRA checkpoint's iter_* directory; None for any other checkpoint."""
    path = Path(directory) / REFERENCE
    return json.loads(path.read_text()) if path.is_file() else None


def options(content: dict[str, Any]) -> LoraOptions:
    return LoraOptions(rank=content["rank"], alpha=content["alpha"], dropout=content["dropout"],
                       targets=tuple(content["targets"]), base_fp8=content["base_fp8"])
