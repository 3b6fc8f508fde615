"""`model=<path>`: a model yaml or a checkpoint (its model.yaml) anywhere, as the `model` config group.

Hydra takes `model=` as the name of an option in conf/model/. Before Hydra composes, a value that
is a path (a yaml file, or a checkpoint root / iter_* directory) is copied as
<temporary dir>/model/<name>.yaml, that directory joins Hydra's search path, and `model=<name>`
takes its place on the command line: the shape trains without copying files into the checkout.
<name> is the yaml's `name` (suffixed when conf/model already has that option, which would come
first on the search path).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from launcher.config.validate import ConfigError
from launcher.package_data import CONF_DIR

CONF_MODELS = CONF_DIR / "model"
# rewritten override -> what the user wrote (absolute): a submitted job resolves it again itself
ORIGINAL: dict[str, str] = {}


def _is_path(value: str) -> bool:
    if (CONF_MODELS / f"{value}.yaml").is_file():
        return False
    return os.sep in value or value.endswith((".yaml", ".yml")) or Path(value).exists()


def resolve_model_argv(argv: list[str]) -> list[str]:
    """`argv` with a `model=<path>` override turned into a search-path option (see the module
    docstring); unchanged without one. A path that holds no model config raises ConfigError("model")."""
    from launcher.model_io import model_yaml_path

    out = list(argv)
    for i, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        if key != "model" or not sep or not _is_path(value):
            continue
        source = model_yaml_path(value)
        shape = yaml.safe_load(source.read_text())
        if not isinstance(shape, dict):
            raise ConfigError("model", f"{source} is not a model config")
        name = str(shape.get("name") or source.stem)
        if (CONF_MODELS / f"{name}.yaml").is_file():
            name += "_file"
        search_dir = Path(tempfile.mkdtemp(prefix="shardforge-model-"))
        atexit.register(shutil.rmtree, search_dir, ignore_errors=True)
        (search_dir / "model").mkdir()
        shutil.copyfile(source, search_dir / "model" / f"{name}.yaml")
        out[i] = f"model={name}"
        ORIGINAL[out[i]] = f"model={Path(value).absolute()}"
        out.insert(i + 1, f"hydra.searchpath=[file://{search_dir}]")  # beside it: before any --flag
        break
    return out
