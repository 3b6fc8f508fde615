"""Checkpoints users can trust: resharding on load, exact resume, saves that survive SIGKILL,
SIGTERM/SIGUSR1 → save and exit 0, keep_last pruning, model-shape mismatch caught up front."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import FAST, REPO, read_metrics, run_cli, train_runs

COMMON = [*FAST, "train.steps=5"]


RESUMES = [("single", [], 1), ("dp2", [], 2), ("tp2pp2", ["parallel.tp=2", "parallel.pp=2"], 4)]


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


def _start(args: list[str], nproc: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "launcher.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
         "launcher.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # Own process group: the kill below takes the whole tree, as a dying node would.
    return subprocess.Popen([*launcher, *FAST, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(predicate, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def test_sigkill_during_save_leaves_latest_loadable(tmp_path, cache_env):
    ckpt = tmp_path / "ckpt"
    proc = _start(["train.steps=500", "checkpoint.save_every=1", f"checkpoint.dir={ckpt}", f"run.dir={tmp_path}"])
    try:
        _wait_for(lambda: (ckpt / "latest").exists())
        # Every step saves; kill the moment a new save is being written.
        _wait_for(lambda: any(p.name.endswith(".tmp") for p in ckpt.iterdir()))
        _kill_tree(proc)
    finally:
        _kill_tree(proc)
        proc.communicate()
    assert any(p.name.endswith(".tmp") for p in ckpt.iterdir())  # the kill did land mid-save
    latest = (ckpt / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    out = run_cli("launcher.train", [*FAST, f"train.steps={step + 1}", f"checkpoint.dir={ckpt}",
                                     f"checkpoint.load={ckpt}", f"run.dir={tmp_path / 'resumed'}"]).stdout
    assert f"steps={step}->{step + 1}" in out
    assert (ckpt / "latest").read_text().strip() == f"iter_{step + 1:07d}"


@pytest.mark.parametrize("sig,nproc", [(signal.SIGTERM, 1), (signal.SIGUSR1, 2)], ids=["sigterm", "sigusr1_2ranks"])
def test_signal_saves_and_exits_cleanly(tmp_path, cache_env, sig, nproc):
    proc = _start(["train.steps=5000", f"run.dir={tmp_path}"], nproc=nproc)
    try:
        _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 2)
        # Like Slurm's --signal: every training process receives it.
        workers = psutil.Process(proc.pid).children(recursive=True) if nproc > 1 else [psutil.Process(proc.pid)]
        for w in workers:
            w.send_signal(sig)
        out, err = proc.communicate(timeout=240)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    last = read_metrics(tmp_path)[-1]["step"]
    assert 2 <= last < 5000
    assert f"saved checkpoint {tmp_path / 'checkpoints' / f'iter_{last:07d}'} after {sig.name}" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{last:07d}"


def test_checkpoint_of_another_model_shape_is_one_clear_error(trained, tmp_path):
    saved = trained / "one_step" / "checkpoints"
    proc = run_cli("launcher.train", [*FAST, "model.num_layers=2", f"checkpoint.load={saved}",
                                      f"run.dir={tmp_path / 'other'}"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: checkpoint.load: ")
    assert "num_layers: checkpoint 4 vs config 2" in proc.stderr
