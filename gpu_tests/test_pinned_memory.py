"""parallel/pinned_memory on a GPU: with exact_pinned_blocks set before CUDA starts, a large pinned
block costs its own size in torch's pinned pool (not the next power of two), and
release_cached_pinned_blocks hands freed pinned blocks back. Each case in a fresh process: the
allocator reads its settings once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
SIZE = 80 * MIB + 4096  # rounds up to 128 MiB


def _pool_bytes(exact: bool, release: bool) -> tuple[int, int]:
    """(pinned pool bytes holding one live SIZE block, pool bytes after it is freed [and released])."""
    code = f"""
import torch
from parallel.pinned_memory import exact_pinned_blocks, release_cached_pinned_blocks
if {exact}:
    exact_pinned_blocks()
torch.cuda.init()
block = torch.empty({SIZE}, dtype=torch.uint8, pin_memory=True)
live = torch.cuda.host_memory_stats()["allocated_bytes.current"]
del block
if {release}:
    release_cached_pinned_blocks(torch.device("cuda"))
print(live, torch.cuda.host_memory_stats()["allocated_bytes.current"])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    live, after = out.stdout.split()[-2:]
    return int(live), int(after)


def test_exact_blocks_cost_their_size():
    rounded, _ = _pool_bytes(exact=False, release=False)
    exact, _ = _pool_bytes(exact=True, release=False)
    assert rounded == 128 * MIB  # torch's default: the next power of two
    assert SIZE <= exact < SIZE + MIB


def test_release_hands_freed_blocks_back():
    _, cached = _pool_bytes(exact=True, release=False)
    _, released = _pool_bytes(exact=True, release=True)
    assert cached >= SIZE and released == 0
