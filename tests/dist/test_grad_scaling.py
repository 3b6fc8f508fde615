"""The gradient scales applied inside the fused AdamW step (parallel/grad_scaling.py) against
megatron-core's own scaling passes: see tests/scripts/grad_scaling_fold.py."""
from __future__ import annotations

from conftest import run_cli


def test_folded_grad_scaling_matches_megatron_scaling():
    assert "GRAD SCALING FOLD OK" in run_cli("tests.scripts.grad_scaling_fold", []).stdout
