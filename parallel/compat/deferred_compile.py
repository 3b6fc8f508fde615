"""megatron-core's fusion functions compiled at their first call instead of at import.

megatron-core decorates its fusion functions (bias-GeLU, SwiGLU, router and dispatcher helpers)
with `megatron.core.jit.jit_fuser`, which is `torch.compile`. Decorating already imports
torch._dynamo and inductor, so every process that imports megatron-core pays their start-up,
also one that never calls any of them (every CPU run, every conversion). Here
`jit_fuser` becomes models/kernels/deferred_compile, which calls torch.compile with the same
arguments the first time the function runs: a function that runs is compiled as before, one that
never runs costs nothing.

`defer_megatron_compile()` arranges this for the first import of `megatron.core` in the process
(the command line entry points call it before anything imports megatron-core); after that import
it does nothing. It applies only to the megatron-core releases in VERIFIED.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
from types import ModuleType
from typing import Any

import torch

from models.kernels.deferred_compile import deferred_compile
from parallel.compat.version import VERIFIED

_JIT = "megatron.core.jit"


class _SetJitFuser(importlib.abc.Loader):
    """Loads megatron.core.jit with its own loader, then swaps its jit_fuser before any other
    megatron module reads it (they do `from megatron.core.jit import jit_fuser`)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        if module.jit_fuser is torch.compile:  # not disabled (megatron's disable_jit_fuser) or replaced
            module.jit_fuser = deferred_compile


class _FindJit(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != _JIT:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _SetJitFuser(spec.loader)
        return spec


def defer_megatron_compile() -> None:
    """Make megatron-core's import-time torch.compile decorators compile at first call, if
    megatron-core (a VERIFIED release) has not been imported yet in this process."""
    if _JIT in sys.modules or any(isinstance(f, _FindJit) for f in sys.meta_path):
        return
    # The installed release from its metadata: check_megatron_version would import megatron-core.
    try:
        installed = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return
    if installed in VERIFIED:
        sys.meta_path.insert(0, _FindJit())
