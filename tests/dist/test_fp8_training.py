"""train.precision=fp8 end to end on CPU (the fp8 GEMMs as fp32 matmuls of fp8 operands): a whole fp8
run against the bf16 run; the GEMMs themselves are checked in tests/unit/test_fp8_linear.py."""
from __future__ import annotations

import pytest

from conftest import FAST, NARROW, train_runs


def test_fp8_run_tracks_the_bf16_run(tmp_path, cache_env):
    """The tiny model at half width (NARROW), 20 steps: fp8 GEMMs against bf16 ones, from the same
    weights and data; and fp8 with the norm and SwiGLU outputs recomputed (which the fp8 linears then
    read in backward instead of fp8 copies) exactly as fp8 without."""
    common = [*FAST, *NARROW, "train.steps=20", "checkpoint.save_every=0", "checkpoint.final_save=false"]
    runs = train_runs(tmp_path, [
        ("bf16", [*common, "train.precision=bf16"], 1), ("fp8", [*common, "train.precision=fp8"], 1),
        ("fp8_rc", [*common, "train.precision=fp8", "train.recompute=[mlp_act,layernorm]"], 1)])
    losses = {name: [m["loss"] for m in metrics] for name, metrics in runs.items()}
    assert losses["fp8"] != losses["bf16"]  # the fp8 GEMMs did run
    assert losses["fp8"] == pytest.approx(losses["bf16"], rel=5e-3)
    assert losses["fp8"][-1] < losses["fp8"][0] - 0.3  # it learns
    assert losses["fp8_rc"] == losses["fp8"]
