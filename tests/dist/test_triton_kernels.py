"""The torch backend's Triton kernels (fused AdamW with remainders and with stochastic rounding,
SwiGLU backward, RMSNorm, RoPE) on CPU through Triton's interpreter, against independent
references: see tests/scripts/triton_kernels_interpreted.py. On the GPU the same kernels run
compiled in gpu_tests/."""
from __future__ import annotations

from conftest import run_cli


def test_triton_kernels_match_their_references_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when triton.jit decorates: before the import
    assert "TRITON KERNELS OK" in run_cli("tests.scripts.triton_kernels_interpreted", [], timeout=600).stdout
