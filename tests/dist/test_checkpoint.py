"""Checkpoint basics: save → load restores weights tensor by tensor and resumes at the saved
step; a run resumed from a checkpoint continues the uninterrupted run's curve exactly."""
from __future__ import annotations

import pytest

from conftest import FAST, read_metrics, run_cli


@pytest.mark.parametrize("tp,pp,nproc", [(1, 1, 1), (2, 1, 2), (1, 2, 2)], ids=["single", "tp2", "pp2"])
def test_save_load_restores_weights_and_optimizer(tp, pp, nproc, tmp_path):
    proc = run_cli("tests.scripts.save_load_roundtrip", [str(tmp_path / "ckpt"), str(tp), str(pp)], nproc=nproc)
    assert "ROUNDTRIP OK" in proc.stdout
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000003"
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_resume_continues_the_same_curve(tmp_path, cache_env):
    common = [*FAST, "train.steps=6", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    run_cli("launcher.train", [*common, "checkpoint.save_every=3", f"run.dir={tmp_path / 'full'}"])
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000006"
    # Resume from the step-3 checkpoint (as after a crash at step 4) into a fresh run dir.
    proc = run_cli("launcher.train", [*common, f"run.dir={tmp_path / 'resumed'}",
                                      f"checkpoint.load={tmp_path / 'ckpt' / 'iter_0000003'}"])
    assert "steps=3->6" in proc.stdout
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    # Exact resume: bit for bit on CPU (model, Adam moments and step, LR schedule, RNG, data position).
    assert [(m["loss"], m["grad_norm"], m["lr"], m["tokens"]) for m in resumed] == \
           [(m["loss"], m["grad_norm"], m["lr"], m["tokens"]) for m in full[3:]]
