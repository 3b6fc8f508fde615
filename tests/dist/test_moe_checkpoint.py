"""MoE checkpoints reshard over expert parallelism: a run saved under ep=2 resumes in one process
(ep=1) and vice versa, and continues the uninterrupted run's curve (weights, expert weights and
Adam moments of both the dense and the expert optimizer resharded)."""
from __future__ import annotations

import pytest

from conftest import FAST, read_metrics, run_cli

STEPS, SAVE_AT = 4, 2
COMMON = [*FAST, "model=mixtral_tiny", "train.seq_length=64", f"train.steps={STEPS}"]
LAYOUTS = {"ep1": ([], 1), "ep2": (["parallel.ep=2"], 2)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cache_env):
    """Per layout: an uninterrupted run that also checkpoints at step SAVE_AT."""
    runs = {}
    for name, (extra, nproc) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(f"moe_{name}")
        run_cli("launcher.train", [*COMMON, *extra, f"checkpoint.save_every={SAVE_AT}", "checkpoint.final_save=false",
                                   f"checkpoint.dir={d / 'ckpt'}", f"run.dir={d / 'run'}"], nproc=nproc)
        runs[name] = d
    return runs


@pytest.mark.parametrize("source,target", [("ep2", "ep1"), ("ep1", "ep2")])
def test_resume_under_another_expert_layout_continues_the_curve(saved, tmp_path, source, target):
    extra, nproc = LAYOUTS[target]
    proc = run_cli("launcher.train", [*COMMON, *extra, "checkpoint.final_save=false", f"run.dir={tmp_path}",
                                      f"checkpoint.load={saved[source] / 'ckpt' / f'iter_{SAVE_AT:07d}'}"], nproc=nproc)
    assert "layout changed" in proc.stdout
    original, resumed = read_metrics(saved[source] / "run")[SAVE_AT:], read_metrics(tmp_path)
    assert [m["step"] for m in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    for a, b in zip(original, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"step {b['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {b['step']}"
        assert b["lr"] == a["lr"]
        assert b["moe_aux_loss"] == pytest.approx(a["moe_aux_loss"], rel=1e-5), f"step {b['step']}"
    # Resuming changed something real: the curve moved on from where it was saved.
    assert resumed[-1]["loss"] != read_metrics(saved[source] / "run")[SAVE_AT - 1]["loss"]
