"""Checkpoints users can trust: save → load restores weights tensor by tensor; a resumed run continues
the uninterrupted run's curve exactly (in its own layout bit for bit, resharded into another within
reduction order); an extended run follows the new schedule; keep_last pruning; a checkpoint of
another model shape is caught up front. Every run of this module shares one launch per world size.
Saves that survive SIGKILL and SIGTERM/SIGUSR1 are tests/e2e/test_signals.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST, NARROW, read_metrics, run_cli, run_many

ROUNDTRIPS = [("single", 1, 1, 1), ("tp2", 2, 1, 2), ("pp2", 1, 2, 2)]  # name, tp, pp, ranks
COMMON = [*FAST, *NARROW, "train.steps=5"]
# Resumes of a tp=2 pp=2 checkpoint in each layout. cp2 also saves at step 4: a checkpoint written
# under context parallelism (RNG streams per dp x cp rank).
RESUMES = [("single", [], 1), ("dp2", [], 2), ("tp2pp2", ["parallel.tp=2", "parallel.pp=2"], 4),
           ("cp2", ["parallel.cp=2", "checkpoint.save_every=1"], 2), ("cp2_tp2", ["parallel.cp=2", "parallel.tp=2"], 4)]


def _train(run_dir: Path, overrides: list[str]) -> list[str]:
    return ["launcher.train", *overrides, f"run.dir={run_dir}"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_env) -> Path:
    """Every run and script of this module, in one launch per world size (4 ranks first: the
    resumes start from its step-3 checkpoint). Each command's stdout goes to the path named beside it.

    - roundtrip/<name>: tests/scripts/save_load_roundtrip.py in each ROUNDTRIPS layout;
    - resumes/: a 6-step run saving at step 3 and its resume from there into a fresh run dir; a
      4-step run, then extended to 8 steps in its own run dir (checkpoint.load=auto, the default),
      once more (nothing left to train), and from its step-4 checkpoint with the saved schedule
      kept; a fresh 8-step run (stdout.<n>.txt, n the order of the runs);
    - tp2pp2_saved: 5 steps under tp=2 pp=2 saving at step 3, and resume_<name> its resume in each
      RESUMES layout; keep_last: 5 steps saving every step, keep_last=2; one_step: the default model."""
    base = tmp_path_factory.mktemp("checkpoint")
    resumes, short = base / "resumes", base / "resumes" / "short"
    resume = ["checkpoint.final_save=false", f"checkpoint.load={base / 'tp2pp2_saved' / 'ckpt' / 'iter_0000003'}"]
    resume_runs = [
        ("full", ["train.steps=6", "checkpoint.save_every=3", f"checkpoint.dir={resumes / 'full' / 'ckpt'}"]),
        ("resumed", ["train.steps=6", f"checkpoint.dir={resumes / 'resumed' / 'ckpt'}",
                     f"checkpoint.load={resumes / 'full' / 'ckpt' / 'iter_0000003'}"]),
        ("short", ["train.steps=4"]),
        ("kept", ["train.steps=8", "checkpoint.keep_saved_schedule=true",
                  f"checkpoint.load={short / 'checkpoints' / 'iter_0000004'}"]),
        ("short", ["train.steps=8"]),
        ("short", ["train.steps=8"]),
        ("fresh8", ["train.steps=8"]),
    ]
    commands = [  # (ranks, stdout file, command)
        (4, base / "tp2pp2_saved" / "stdout.txt",
         _train(base / "tp2pp2_saved", [*COMMON, "parallel.tp=2", "parallel.pp=2", "checkpoint.save_every=3",
                                        f"checkpoint.dir={base / 'tp2pp2_saved' / 'ckpt'}"])),
        *[(n, base / "roundtrip" / f"{name}.txt",
           ["tests.scripts.save_load_roundtrip", str(base / "roundtrip" / name), str(tp), str(pp)])
          for name, tp, pp, n in ROUNDTRIPS],
        *[(1, resumes / name / f"stdout.{i}.txt", _train(resumes / name, [*FAST, *NARROW, *overrides]))
          for i, (name, overrides) in enumerate(resume_runs)],
        *[(n, base / f"resume_{name}" / "stdout.txt", _train(base / f"resume_{name}", [*COMMON, *extra, *resume]))
          for name, extra, n in RESUMES],
        (1, base / "keep_last" / "stdout.txt",
         _train(base / "keep_last", [*COMMON, "checkpoint.save_every=1", "checkpoint.keep_last=2"])),
        (1, base / "one_step" / "stdout.txt", _train(base / "one_step", [*FAST, *NARROW, "train.steps=1"])),
    ]
    for nproc in dict.fromkeys(n for n, *_ in commands):
        mine = [(path, command) for n, path, command in commands if n == nproc]
        for (path, _), text in zip(mine, run_many([command for _, command in mine], nproc=nproc)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return base


@pytest.fixture(scope="module")
def roundtrips(base) -> Path:
    return base / "roundtrip"


@pytest.fixture(scope="module")
def resumes(base) -> Path:
    return base / "resumes"


@pytest.mark.parametrize("name", [x[0] for x in ROUNDTRIPS])
def test_save_load_restores_weights_and_optimizer(roundtrips, name):
    assert "ROUNDTRIP OK" in (roundtrips / f"{name}.txt").read_text()
    assert (roundtrips / name / "latest").read_text().strip() == "iter_0000003"
    assert not list((roundtrips / name).glob("*.tmp"))


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

    args = ModelArgs.from_config(yaml.safe_load((resumes / "short" / ".hydra" / "config.yaml").read_text())["model"])
    saved = sum(p.stat().st_size for p in (resumes / "short" / "checkpoints" / "iter_0000008").rglob("*")
                if p.is_file())
    assert preflight.checkpoint_bytes(args, 4) == pytest.approx(saved, rel=0.05)


@pytest.mark.parametrize("name", [x[0] for x in RESUMES])
def test_resume_in_another_layout_continues_the_curve(base, name):
    original, resumed = read_metrics(base / "tp2pp2_saved")[3:], read_metrics(base / f"resume_{name}")
    assert [m["step"] for m in resumed] == [4, 5]
    if name == "cp2":
        assert (base / "resume_cp2" / "checkpoints" / "iter_0000004" / "metadata.json").is_file()
    if name == "tp2pp2":  # same layout: bit for bit, RNG streams included
        assert [(m["loss"], m["grad_norm"], m["lr"]) for m in resumed] == \
               [(m["loss"], m["grad_norm"], m["lr"]) for m in original]
    else:  # weights and Adam moments resharded: same numbers up to reduction order
        assert "layout changed" in (base / f"resume_{name}" / "stdout.txt").read_text()
        for a, b in zip(original, resumed):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # as in test_parity
            assert b["lr"] == a["lr"]


def test_keep_last_prunes_after_each_complete_save(base):
    ckpt = base / "keep_last" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000004", "iter_0000005", "latest"]


def test_checkpoint_of_another_model_shape_is_one_clear_error(base, tmp_path):
    saved = base / "one_step" / "checkpoints"
    proc = run_cli("launcher.train", [*FAST, *NARROW, "model.num_layers=2", f"checkpoint.load={saved}",
                                      f"run.dir={tmp_path / 'other'}"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: checkpoint.load: ")
    assert "num_layers: checkpoint 4 vs config 2" in proc.stderr
