"""parallel/pinned_memory.exact_pinned_blocks: the allocator setting it adds to the environment."""
from __future__ import annotations

import pytest

from parallel.pinned_memory import EXACT_ABOVE_MB, ROUND_KEY, exact_pinned_blocks


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    return monkeypatch


def test_sets_the_threshold_when_nothing_is_set(env):
    import os

    exact_pinned_blocks()
    assert os.environ["PYTORCH_ALLOC_CONF"] == f"{ROUND_KEY}:{EXACT_ABOVE_MB}"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_keeps_the_users_other_settings(env):
    import os

    env.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    exact_pinned_blocks()
    assert os.environ["PYTORCH_ALLOC_CONF"] == f"expandable_segments:True,{ROUND_KEY}:{EXACT_ABOVE_MB}"


def test_a_threshold_the_user_set_wins(env):
    import os

    env.setenv("PYTORCH_ALLOC_CONF", f"{ROUND_KEY}:1024")
    exact_pinned_blocks()
    assert os.environ["PYTORCH_ALLOC_CONF"] == f"{ROUND_KEY}:1024"


def test_extends_the_older_variable_when_only_it_is_set(env):
    import os

    env.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    exact_pinned_blocks()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == f"max_split_size_mb:512,{ROUND_KEY}:{EXACT_ABOVE_MB}"
    assert "PYTORCH_ALLOC_CONF" not in os.environ  # torch rejects both set at once
