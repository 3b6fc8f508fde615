"""parallel/pinned_memory on a GPU: release_cached_pinned_blocks hands freed pinned blocks back to
the system (torch's pinned pool keeps them otherwise). Each case in a fresh process: an empty pool."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
SIZE = 80 * MIB + 4096


def _pool_bytes(release: bool) -> tuple[int, int]:
    """(pinned pool bytes holding one live SIZE block, pool bytes after it is freed [and released])."""
    code = f"""
import torch
from parallel.pinned_memory import release_cached_pinned_blocks
torch.cuda.init()  # host_memory_stats() is empty until CUDA is initialized, which pinning alone need not do
block = torch.empty({SIZE}, dtype=torch.uint8, pin_memory=True)
live = torch.cuda.host_memory_stats()["allocated_bytes.current"]
del block
if {release}:
    release_cached_pinned_blocks(torch.device("cuda"))
print(live, torch.cuda.host_memory_stats()["allocated_bytes.current"])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    live, after = out.stdout.split()[-2:]
    return int(live), int(after)


def test_release_hands_freed_blocks_back():
    live, cached = _pool_bytes(release=False)
    _, released = _pool_bytes(release=True)
    assert live >= SIZE and cached == live and released == 0
