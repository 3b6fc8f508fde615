"""Checkpoint basics: save → load restores weights tensor by tensor and resumes at the saved
step; a run resumed from a checkpoint continues the uninterrupted run's curve exactly."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST, run_many, train_runs


ROUNDTRIPS = [("single", 1, 1, 1), ("tp2", 2, 1, 2), ("pp2", 1, 2, 2)]  # name, tp, pp, ranks


@pytest.fixture(scope="module")
def roundtrips(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """tests/scripts/save_load_roundtrip.py in each layout (one launch per world size): its
    checkpoint directories and outputs."""
    base = tmp_path_factory.mktemp("roundtrip")
    outputs = {}
    for nproc in (1, 2):
        names = [name for name, *_, n in ROUNDTRIPS if n == nproc]
        outputs.update(zip(names, run_many([["tests.scripts.save_load_roundtrip", str(base / name), str(tp), str(pp)]
                                            for name, tp, pp, n in ROUNDTRIPS if n == nproc], nproc=nproc)))
    return base, outputs


@pytest.mark.parametrize("name", [x[0] for x in ROUNDTRIPS])
def test_save_load_restores_weights_and_optimizer(roundtrips, name):
    base, outputs = roundtrips
    assert "ROUNDTRIP OK" in outputs[name]
    assert (base / name / "latest").read_text().strip() == "iter_0000003"
    assert not list((base / name).glob("*.tmp"))


def test_resume_continues_the_same_curve(tmp_path, cache_env):
    common = [*FAST, "train.steps=6"]
    ckpt = tmp_path / "full" / "ckpt"
    # Resume from the step-3 checkpoint (as after a crash at step 4) into a fresh run dir.
    metrics = train_runs(tmp_path, [
        ("full", [*common, "checkpoint.save_every=3", f"checkpoint.dir={ckpt}"], 1),
        ("resumed", [*common, f"checkpoint.dir={tmp_path / 'resumed' / 'ckpt'}",
                     f"checkpoint.load={ckpt / 'iter_0000003'}"], 1)])
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    assert "steps=3->6" in (tmp_path / "resumed" / "stdout.txt").read_text()
    full, resumed = metrics["full"], metrics["resumed"]
    assert [m["step"] for m in resumed] == [4, 5, 6]
    # Exact resume: bit for bit on CPU (model, Adam moments and step, LR schedule, RNG, data position).
    assert [(m["loss"], m["grad_norm"], m["lr"], m["tokens"]) for m in resumed] == \
           [(m["loss"], m["grad_norm"], m["lr"], m["tokens"]) for m in full[3:]]
