"""`deferred_compile`: torch.compile made at a function's first call instead of where it is defined.

`torch.compile(fn)` at module level imports torch._dynamo and inductor right away, a start-up cost
also in a process that never calls `fn`: a CPU run, a conversion, a config check.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch


def deferred_compile(fn: Callable | None = None, **options: Any) -> Callable:
    """`torch.compile(fn, **options)`, made the first time the returned function is called. Called
    while torch.compile traces an enclosing function, it runs `fn` itself, which that trace inlines
    (as it inlines a torch.compile'd function)."""
    if fn is None:  # used as @deferred_compile(**options)
        return lambda f: deferred_compile(f, **options)
    compiled: Callable | None = None

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return run
