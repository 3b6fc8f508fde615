"""MoE checkpoints reshard over expert parallelism: a run saved under ep=2 resumes in one process
(ep=1) and vice versa, and continues the uninterrupted run's curve (weights, expert weights and
Adam moments of both the dense and the expert optimizer resharded)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST, read_metrics, train_runs

STEPS, SAVE_AT = 4, 2
COMMON = [*FAST, "model=mixtral_tiny", "train.seq_length=64", f"train.steps={STEPS}"]
LAYOUTS = {"ep1": ([], 1), "ep2": (["parallel.ep=2"], 2)}
RESUMES = [("ep2", "ep1"), ("ep1", "ep2")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env) -> Path:
    """Per layout: an uninterrupted run that also checkpoints at step SAVE_AT ("<layout>_saved"),
    and the resume of the other layout's checkpoint ("<source>_to_<target>")."""
    base = tmp_path_factory.mktemp("moe_checkpoint")
    once = [*COMMON, "checkpoint.final_save=false"]
    saves = [(f"{name}_saved", [*once, *extra, f"checkpoint.save_every={SAVE_AT}",
                                f"checkpoint.dir={base / f'{name}_saved' / 'ckpt'}"], n)
             for name, (extra, n) in LAYOUTS.items()]
    saved_at = f"iter_{SAVE_AT:07d}"
    resumes = [(f"{source}_to_{target}",
                [*once, *LAYOUTS[target][0], f"checkpoint.load={base / f'{source}_saved' / 'ckpt' / saved_at}"],
                LAYOUTS[target][1]) for source, target in RESUMES]
    # Launches run one world size after another (ep1's, then ep2's): ep2's ranks resume ep1's
    # checkpoint after saving their own; one more launch for ep1's resume of ep2's.
    train_runs(base, [*saves, *[r for r in resumes if r[0] == "ep1_to_ep2"]])
    train_runs(base, [r for r in resumes if r[0] == "ep2_to_ep1"])
    return base


@pytest.mark.parametrize("source,target", RESUMES)
def test_resume_under_another_expert_layout_continues_the_curve(trained, source, target):
    resumed_dir = trained / f"{source}_to_{target}"
    assert "layout changed" in (resumed_dir / "stdout.txt").read_text()
    saved = read_metrics(trained / f"{source}_saved")
    original, resumed = saved[SAVE_AT:], read_metrics(resumed_dir)
    assert [m["step"] for m in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    for a, b in zip(original, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"step {b['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {b['step']}"
        assert b["lr"] == a["lr"]
        assert b["moe_aux_loss"] == pytest.approx(a["moe_aux_loss"], rel=1e-5), f"step {b['step']}"
    # Resuming changed something real: the curve moved on from where it was saved.
    assert resumed[-1]["loss"] != saved[SAVE_AT - 1]["loss"]
