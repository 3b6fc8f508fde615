"""Where the files that ship beside the code are: the Hydra config tree (conf/) and the Slurm job
template (slurm/).

In a source checkout (and an editable install) they are the top-level conf/ and slurm/ folders,
the ones users edit. An installed wheel carries them inside this package as launcher/conf and
launcher/slurm (setup.py maps them there), so a non-editable install finds them too.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    inside = _PACKAGE / name  # an installed wheel
    return inside if inside.is_dir() else _PACKAGE.parent / name  # a source checkout


CONF_DIR: Path = _shipped("conf")
SLURM_DIR: Path = _shipped("slurm")


def model_yaml(name: str) -> Path:
    """conf/model/<name>.yaml: the shape `model=<name>` selects."""
    return CONF_DIR / "model" / f"{name}.yaml"
