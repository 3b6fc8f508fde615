"""parallel/pinned_memory.exact_pinned_blocks: the allocator setting it puts in force (torch's own
settings string read back), keeping the settings already there, and a threshold the user chose."""
from __future__ import annotations

import pytest
import torch

from parallel.pinned_memory import EXACT_ABOVE_MB, ROUND_KEY, exact_pinned_blocks


@pytest.fixture
def settings():
    """torch's allocator settings string; restored after the test."""
    before = torch._C._accelerator_getAllocatorSettings()
    yield torch._C._accelerator_setAllocatorSettings
    torch._C._accelerator_setAllocatorSettings(before)


def test_puts_the_threshold_in_force_keeping_other_settings(settings):
    settings("garbage_collection_threshold:0.8")
    assert exact_pinned_blocks()
    assert torch._C._accelerator_getAllocatorSettings() == \
        f"garbage_collection_threshold:0.8,{ROUND_KEY}:{EXACT_ABOVE_MB}"


def test_a_threshold_the_user_set_wins(settings):
    settings(f"{ROUND_KEY}:1024")
    assert exact_pinned_blocks()
    assert torch._C._accelerator_getAllocatorSettings() == f"{ROUND_KEY}:1024"
