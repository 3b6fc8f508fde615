"""The in-place recomputes on the GPU (models/mlp_act_recompute.py, models/norm_recompute.py):
`train.recompute=[mlp_act,layernorm]` frees the SwiGLU and norm outputs after their consumers'
forward and refills them before their consumers' backward. In fp32 the refill is the same
kernels on the same inputs, so every step's loss and grad norm must match the run that keeps
the outputs (1e-6), eager and under the CUDA graph, while its peak memory is lower. Under
train.precision=fp8 the fp8 linears then read the refilled inputs (their `keep_input`, set by
models/kernel_provider.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _train(run_dir, *extra: str, precision: str = "fp32") -> list[dict]:
    cmd = [sys.executable, "-m", "launcher.train", "model=tiny", "device=cuda", f"train.precision={precision}",
           "train.steps=6", "train.seq_length=1024", "train.global_batch_size=32", "train.micro_batch_size=16",
           "logging.wandb.mode=disabled", "logging.progress=false", "checkpoint.final_save=false",
           f"run.dir={run_dir}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("graph", ["false", "true"], ids=["eager", "cuda_graph"])
def test_recompute_matches_kept_outputs(tmp_path, graph):
    kept = _train(tmp_path / "kept", f"train.cuda_graph={graph}")
    recomputed = _train(tmp_path / "recomputed", f"train.cuda_graph={graph}", "train.recompute=[mlp_act,layernorm]")
    assert len(kept) == len(recomputed) == 6
    for a, b in zip(kept, recomputed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), a["step"]
    assert kept[-1]["loss"] < kept[0]["loss"]
    # SwiGLU output (ffn 704) + two norm outputs (hidden 256) a layer, 16k tokens, fp32: 78 MiB a layer,
    # 0.3 GiB over 4 layers (the refills must let go after their backward, or the peak moves there)
    assert recomputed[-1]["peak_mem_gb"] < kept[-1]["peak_mem_gb"] - 0.2


def test_fp8_linears_read_the_refilled_inputs(tmp_path):
    """Under train.precision=fp8 the linears behind a recompute hold its refilled input, not an fp8
    copy: the same losses (bf16 model: the refill may round differently, 1e-3) and less memory."""
    kept = _train(tmp_path / "kept", precision="fp8")
    recomputed = _train(tmp_path / "recomputed", "train.recompute=[mlp_act,layernorm]", precision="fp8")
    for a, b in zip(kept, recomputed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), a["step"]
    assert kept[-1]["loss"] < kept[0]["loss"]
    # fp8 copies of the qkv, fc1 (hidden 256) and fc2 (ffn 704) inputs, 16k tokens: 19 MiB a layer, 4 layers
    assert recomputed[-1]["peak_mem_gb"] < kept[-1]["peak_mem_gb"] - 0.04
