"""launcher/host_memory.py: each host storage counted once, in the component that holds it."""
from __future__ import annotations

import types

import pytest
import torch

from launcher.host_memory import GiB, host_memory


def test_optimizer_state_params_and_buffers_counted_once():
    weight = torch.nn.Parameter(torch.zeros(1000))
    flat = torch.zeros(3000)  # a buffer the engine's optimizer holds, and a view of it held again
    adamw = torch.optim.AdamW([weight])
    weight.grad = torch.ones(1000)
    adamw.step()
    partition = torch.zeros(500, dtype=torch.bfloat16)  # a ZeRO-3 parameter's host partition
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_tensor = partition
    masters = [torch.zeros(700)]  # ZeRO-3's fp32 partitions: state, though not in its CPU Adam's groups
    engine_optimizer = types.SimpleNamespace(optimizer=adamw, flat=flat, views=[flat[:10], weight],
                                             fp32_partitioned_groups_flat=masters)
    got = host_memory(engine_optimizer, [weight, placeholder])
    pageable = {k: v * GiB for k, v in got.items() if k.endswith("_pageable_gb")}
    # param + grad + exp_avg + exp_avg_sq (the step counter's 4 bytes as well)
    assert pageable["host_state_pageable_gb"] == pytest.approx(4 * 1000 * 4 + 4 + 700 * 4)
    assert pageable["host_params_pageable_gb"] == 500 * 2
    assert pageable["host_buffers_pageable_gb"] == 3000 * 4
    assert got["host_rss_gb"] > 0
