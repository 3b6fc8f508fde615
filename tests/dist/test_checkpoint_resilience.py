"""Checkpoints users can trust: resharding on load, exact resume, keep_last pruning, model-shape
mismatch caught up front. Saves that survive SIGKILL and SIGTERM/SIGUSR1 are tests/e2e/test_signals.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST, read_metrics, run_cli, train_runs

COMMON = [*FAST, "train.steps=5"]


# cp2 also saves at step 4: a checkpoint written under context parallelism (RNG streams per dp x cp rank).
RESUMES = [("single", [], 1), ("dp2", [], 2), ("tp2pp2", ["parallel.tp=2", "parallel.pp=2"], 4),
           ("cp2", ["parallel.cp=2", "checkpoint.save_every=1"], 2), ("cp2_tp2", ["parallel.cp=2", "parallel.tp=2"], 4)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env) -> Path:
    """5 steps under tp=2 pp=2 (4 ranks) with a checkpoint at step 3, its resume in each layout;
    5 steps saving every step with keep_last=2; one step of the default model."""
    base = tmp_path_factory.mktemp("resilience")
    resume = ["checkpoint.final_save=false", f"checkpoint.load={base / 'tp2pp2_saved' / 'ckpt' / 'iter_0000003'}"]
    train_runs(base, [
        ("tp2pp2_saved", [*COMMON, "parallel.tp=2", "parallel.pp=2", "checkpoint.save_every=3",
                          f"checkpoint.dir={base / 'tp2pp2_saved' / 'ckpt'}"], 4),
        *[(f"resume_{name}", [*COMMON, *extra, *resume], n) for name, extra, n in RESUMES],
        ("keep_last", [*COMMON, "checkpoint.save_every=1", "checkpoint.keep_last=2"], 1),
        ("one_step", [*FAST, "train.steps=1"], 1)])
    return base


@pytest.mark.parametrize("name", [x[0] for x in RESUMES])
def test_resume_in_another_layout_continues_the_curve(trained, name):
    original, resumed = read_metrics(trained / "tp2pp2_saved")[3:], read_metrics(trained / f"resume_{name}")
    assert [m["step"] for m in resumed] == [4, 5]
    if name == "cp2":
        assert (trained / "resume_cp2" / "checkpoints" / "iter_0000004" / "metadata.json").is_file()
    if name == "tp2pp2":  # same layout: bit for bit, RNG streams included
        assert [(m["loss"], m["grad_norm"], m["lr"]) for m in resumed] == \
               [(m["loss"], m["grad_norm"], m["lr"]) for m in original]
    else:  # weights and Adam moments resharded: same numbers up to reduction order
        assert "layout changed" in (trained / f"resume_{name}" / "stdout.txt").read_text()
        for a, b in zip(original, resumed):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # as in test_parity
            assert b["lr"] == a["lr"]


def test_keep_last_prunes_after_each_complete_save(trained):
    ckpt = trained / "keep_last" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000004", "iter_0000005", "latest"]


def test_checkpoint_of_another_model_shape_is_one_clear_error(trained, tmp_path):
    saved = trained / "one_step" / "checkpoints"
    proc = run_cli("launcher.train", [*FAST, "model.num_layers=2", f"checkpoint.load={saved}",
                                      f"run.dir={tmp_path / 'other'}"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: checkpoint.load: ")
    assert "num_layers: checkpoint 4 vs config 2" in proc.stderr
