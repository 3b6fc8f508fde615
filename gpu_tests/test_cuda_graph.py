"""train.cuda_graph (parallel/cuda_graph.py) on the GPU: the same bf16 run eager and with the
forward+backward replayed as a CUDA graph from step 2 on. The data change every step, so a
graph that replayed stale inputs or dropped the gradient accumulation would drift from the
eager run; per-step loss and grad norm must agree within the bf16 tolerance (1e-2). A MoE model on
the fused dispatch is captured too: its routers' token counts (the step's MoE metrics) must follow
the replays."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _train(tmp_path, graph: str, *extra: str, model: str = "tiny") -> tuple[str, list[dict]]:
    run_dir = tmp_path / f"graph_{graph}"
    precision = [] if any(e.startswith("train.precision=") for e in extra) else ["train.precision=bf16"]
    cmd = [sys.executable, "-m", "launcher.train", f"model={model}", "device=cuda", *precision,
           "train.steps=8", "train.global_batch_size=8", "train.micro_batch_size=4", f"train.cuda_graph={graph}",
           "logging.wandb.mode=disabled", "logging.progress=false", "checkpoint.final_save=false",
           f"run.dir={run_dir}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, records


@pytest.mark.parametrize("extra", [[], ["train.recompute=full"], ["train.precision=fp8"]],
                         ids=["plain", "full_recompute", "fp8"])
def test_graph_replay_matches_eager(tmp_path, extra):
    eager_out, eager = _train(tmp_path, "false", *extra)
    graph_out, graphed = _train(tmp_path, "true", *extra)
    assert "cuda_graph=on" in graph_out and "cuda_graph=on" not in eager_out
    assert len(eager) == len(graphed) == 8
    for a, b in zip(eager, graphed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2), a["step"]
    # the run trains: later steps differ from the first (replays see new data and new weights)
    assert len({round(r["loss"], 4) for r in graphed}) > 4


def test_fused_moe_graph_replay_matches_eager(tmp_path):
    eager_out, eager = _train(tmp_path, "false", "train.moe_dispatch=fused", model="mixtral_tiny")
    graph_out, graphed = _train(tmp_path, "true", "train.moe_dispatch=fused", model="mixtral_tiny")
    assert "cuda_graph=on" in graph_out and "cuda_graph=on" not in eager_out
    assert len(eager) == len(graphed) == 8
    for a, b in zip(eager, graphed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2), a["step"]
        assert b["moe_aux_loss"] == pytest.approx(a["moe_aux_loss"], rel=1e-2), a["step"]
        # every routed token counted in the replayed steps as well (top-k of each token, each step)
        assert b["moe_load_mean"] == a["moe_load_mean"] > 0, a["step"]
    assert len({round(r["loss"], 4) for r in graphed}) > 4


def test_graph_run_saves_and_resumes(tmp_path):
    """Checkpoints of a graphed run (graph-safe RNG trackers) save, and resume into a graphed run
    that continues as the uninterrupted eager run does."""
    _, eager = _train(tmp_path, "false")
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, "true", "checkpoint.save_every=4", f"checkpoint.dir={ckpt}")
    assert (ckpt / "iter_0000004").is_dir()
    (tmp_path / "graph_true" / "metrics.jsonl").unlink()
    _, resumed = _train(tmp_path, "true", f"checkpoint.load={ckpt / 'iter_0000004'}", f"checkpoint.dir={ckpt}")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(eager[4:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), a["step"]
