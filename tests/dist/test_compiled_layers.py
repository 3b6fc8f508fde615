"""train.compile: torch.compile'd transformer layers against eager ones; see tests/scripts/compiled_layers.py."""
from __future__ import annotations

from conftest import run_cli


def test_compiled_layers_match_eager():
    assert "COMPILED LAYERS OK" in run_cli("tests.scripts.compiled_layers", [], timeout=600).stdout
