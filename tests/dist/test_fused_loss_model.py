"""The tiny model's training loss through the fused output layer + cross entropy equals megatron's
logits + cross entropy path: see tests/scripts/fused_loss_model.py."""
from __future__ import annotations

from conftest import run_cli


def test_model_fused_loss_matches_megatron_loss():
    assert "FUSED LOSS OK" in run_cli("tests.scripts.fused_loss_model", []).stdout
