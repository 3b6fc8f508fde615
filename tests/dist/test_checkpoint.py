"""Checkpoint basics: save → load restores weights tensor by tensor and resumes at the saved
step; a run resumed from a checkpoint continues the uninterrupted run's curve exactly."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST, REPO, read_metrics, run_many


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


@pytest.fixture(scope="module")
def resumes(tmp_path_factory, cache_env) -> Path:
    """One launch: a 6-step run saving at step 3 and its resume from there into a fresh run dir; a
    4-step run, then extended to 8 steps in its own run dir (checkpoint.load=auto, the default),
    once more (nothing left to train), and from its step-4 checkpoint with the saved schedule kept;
    a fresh 8-step run. Each run's stdout is <run dir>/stdout.<n>.txt."""
    base = tmp_path_factory.mktemp("resumes")
    short = base / "short"
    runs = [
        ("full", ["train.steps=6", "checkpoint.save_every=3", f"checkpoint.dir={base / 'full' / 'ckpt'}"]),
        ("resumed", ["train.steps=6", f"checkpoint.dir={base / 'resumed' / 'ckpt'}",
                     f"checkpoint.load={base / 'full' / 'ckpt' / 'iter_0000003'}"]),
        ("short", ["train.steps=4"]),
        ("kept", ["train.steps=8", "checkpoint.keep_saved_schedule=true",
                  f"checkpoint.load={short / 'checkpoints' / 'iter_0000004'}"]),
        ("short", ["train.steps=8"]),
        ("short", ["train.steps=8"]),
        ("fresh8", ["train.steps=8"]),
    ]
    outputs = run_many([["launcher.train", *FAST, *overrides, f"run.dir={base / name}"] for name, overrides in runs])
    for n, ((name, _), text) in enumerate(zip(runs, outputs)):
        (base / name / f"stdout.{n}.txt").write_text(text)
    return base


def test_resume_continues_the_same_curve(resumes):
    ckpt = resumes / "full" / "ckpt"
    # Resumed from the step-3 checkpoint (as after a crash at step 4) into a fresh run dir.
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    assert "steps=3->6" in (resumes / "resumed" / "stdout.1.txt").read_text()
    full, resumed = read_metrics(resumes / "full"), read_metrics(resumes / "resumed")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    # Exact resume: bit for bit on CPU (model, Adam moments and step, LR schedule, RNG, data position).
    assert [(m["loss"], m["grad_norm"], m["lr"], m["tokens"]) for m in resumed] == \
           [(m["loss"], m["grad_norm"], m["lr"], m["tokens"]) for m in full[3:]]


def test_an_extended_run_follows_the_new_schedule_from_the_resumed_step(resumes):
    short, fresh = read_metrics(resumes / "short"), read_metrics(resumes / "fresh8")
    out = (resumes / "short" / "stdout.4.txt").read_text()
    assert "steps=4->8" in out
    assert "lr schedule: following this config's from step 4 (train.steps 4 -> 8)" in out
    # one metrics.jsonl across the resume, each step once
    assert [m["step"] for m in short] == list(range(1, 9))
    # steps 5..8 at the lr a fresh 8-step run has there (steps 3, 4 decayed over 4 steps: they differ)
    assert [m["lr"] for m in short[4:]] == [m["lr"] for m in fresh[4:]]
    assert short[3]["lr"] != fresh[3]["lr"]
    # the checkpoint's schedule, when asked to keep it: past its 4 steps that is min_lr throughout
    kept_out = (resumes / "kept" / "stdout.3.txt").read_text()
    assert "lr schedule: keeping the checkpoint's (checkpoint.keep_saved_schedule=true)" in kept_out
    assert [m["lr"] for m in read_metrics(resumes / "kept")] == [pytest.approx(3e-5, rel=1e-12)] * 4


def test_a_run_already_at_train_steps_has_nothing_to_train(resumes):
    short = resumes / "short"
    out = (short / "stdout.5.txt").read_text()
    assert f"nothing to train: {short / 'checkpoints'} is at step 8 and train.steps=8" in out
    assert "layout[" not in out  # no model was built
    assert [m["step"] for m in read_metrics(short)] == list(range(1, 9))
    assert (short / "checkpoints" / "latest").read_text().strip() == "iter_0000008"


def test_the_start_up_disk_check_expects_the_size_a_checkpoint_has(resumes):
    import yaml

    from launcher import preflight
    from models.args import ModelArgs

    args = ModelArgs.from_config(yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text()))
    saved = sum(p.stat().st_size for p in (resumes / "short" / "checkpoints" / "iter_0000008").rglob("*")
                if p.is_file())
    assert preflight.checkpoint_bytes(args, 4) == pytest.approx(saved, rel=0.05)
