"""Checkpoints that survive the process dying: SIGKILL in the middle of a save leaves `latest`
loadable; SIGTERM/SIGUSR1 (preemption, Slurm's --signal) save and exit 0, on one rank and two."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import FAST, REPO, read_metrics, run_cli


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
