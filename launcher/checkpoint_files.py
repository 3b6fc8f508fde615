"""What makes a checkpoint usable on its own: the model shape and the tokenizer, as files inside
every iter_* directory, and where the commands that read a checkpoint find them.

    iter_0000200/model.yaml     the composed model config (conf/model/*.yaml format): generate,
                                export_hf and `launcher.train model=<checkpoint dir>` read it
    iter_0000200/tokenizer/     the files that rebuild the run's tokenizer (tokenizer.model, or
                                tokenizer.json + tokenizer_config.json / chat template)
    iter_0000000/hf_config.json an HF import's source config.json (export reuses its architecture)

Writers hand these to launcher.checkpoint (`files=`), which writes them with the rest of the
checkpoint, through the same temporary directory and rename. Checkpoints written before kept them
next to `latest` (<root>/model.yaml, <root>/tokenizer/): the finders look there too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

if TYPE_CHECKING:
    from launcher.checkpoint import FileSource
    from launcher.data.tokenizer import Tokenizer

MODEL_YAML = "model.yaml"
TOKENIZER_DIR = "tokenizer"
HF_CONFIG = "hf_config.json"
HF_GENERATION_CONFIG = "hf_generation_config.json"


def model_yaml(model: Mapping[str, Any]) -> bytes:
    """A model config as conf/model/*.yaml content (lists for tuples: plain YAML)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model).items()}
    return yaml.safe_dump(plain, sort_keys=False).encode()


def checkpoint_files(model: Mapping[str, Any], tokenizer: Tokenizer | None) -> dict[str, FileSource]:
    """The files a training checkpoint carries besides the engine's state."""
    files: dict[str, FileSource] = {MODEL_YAML: model_yaml(model)}
    if tokenizer is not None:
        files.update({f"{TOKENIZER_DIR}/{name}": path for name, path in tokenizer.include_in_checkpoints().items()})
    return files


def iter_directory(path: str | os.PathLike) -> Path:
    """A checkpoint root (its `latest`) or an iter_* directory -> the iter_* directory (no check
    that it is complete: launcher.checkpoint.resolve does that, with megatron imported)."""
    from launcher.checkpoint import LATEST

    path = Path(path)
    latest = path / LATEST
    return path / latest.read_text().strip() if latest.is_file() else path


def find(directory: Path, name: str) -> Path | None:
    """`name` in an iter_* directory, else next to its `latest` (older checkpoints); None if neither."""
    from launcher.checkpoint import root_of

    for candidate in (directory / name, root_of(directory) / name):
        if candidate.exists():
            return candidate
    return None


def tokenizer_files(directory: Path) -> dict[str, FileSource]:
    """A checkpoint's tokenizer files, to carry into a checkpoint made from it (a conversion)."""
    found = find(directory, TOKENIZER_DIR)
    if found is None or not found.is_dir():
        return {}
    return {f"{TOKENIZER_DIR}/{f.name}": f for f in sorted(found.iterdir()) if f.is_file()}
