"""Checkpoints that survive the process dying: SIGKILL in the middle of a save leaves `latest`
loadable; Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM/SIGUSR1
(preemption, Slurm's --signal) save and exit 0, on one rank and two; a second Ctrl-C aborts at once."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from conftest import FAST, NARROW, REPO, cli_command, launch_env, read_metrics, run_cli


def _start(args: list[str], nproc: int = 1) -> subprocess.Popen:
    # Own process group: the kill below takes the whole tree, as a dying node would.
    return subprocess.Popen(cli_command("launcher.train", [*FAST, *NARROW, *args], nproc), cwd=REPO, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


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
    out = run_cli("launcher.train", [*FAST, *NARROW, f"train.steps={step + 1}", f"checkpoint.dir={ckpt}",
                                     f"checkpoint.load={ckpt}", f"run.dir={tmp_path / 'resumed'}"]).stdout
    assert f"steps={step}->{step + 1}" in out
    assert (ckpt / "latest").read_text().strip() == f"iter_{step + 1:07d}"


@pytest.mark.parametrize("nproc", [1, 2], ids=["ctrl_c", "term_usr1_2ranks"])
def test_signal_saves_and_exits_cleanly(tmp_path, cache_env, nproc):
    proc = _start(["train.steps=5000", f"run.dir={tmp_path}"], nproc=nproc)
    try:
        _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 2)
        if nproc == 1:
            # Ctrl-C: the terminal signals the whole process group. Twice within a moment is one
            # keypress as torchrun's workers see it (the terminal's, then torchrun's own copy).
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            sig = signal.SIGINT
        else:
            # Slurm's --signal and a preemption reach every training process; one rank's signal is enough
            workers = psutil.Process(proc.pid).children(recursive=True)
            assert len(workers) == 2
            workers[0].send_signal(signal.SIGUSR1)
            workers[1].send_signal(signal.SIGTERM)
            sig = signal.SIGTERM  # the ranks agree on the highest-numbered signal any of them got
        out, err = proc.communicate(timeout=240)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    last = read_metrics(tmp_path)[-1]["step"]
    assert 2 <= last < 5000
    assert f"saved checkpoint {tmp_path / 'checkpoints' / f'iter_{last:07d}'} after {sig.name}" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{last:07d}"
    if nproc == 1:  # one line for the Ctrl-C, no traceback
        assert [line for line in err.splitlines() if "interrupt" in line.lower()] == [
            "shardforge: interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort "
            "without saving)"], err[-3000:]
        assert "Traceback" not in err, err[-3000:]


def test_a_second_ctrl_c_aborts_at_once(tmp_path, cache_env):
    # Steps of several seconds (32 rows of 256 tokens on one CPU thread): the second Ctrl-C lands
    # inside the step the first one lets finish.
    proc = _start(["train.steps=50", "train.global_batch_size=32", "train.micro_batch_size=4",
                   "train.seq_length=256", f"run.dir={tmp_path}"])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: (tmp_path / "metrics.jsonl").exists())  # the training loop has started
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(lambda: any("interrupted:" in line for line in lines), timeout=30)
        time.sleep(1.5)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=30)
        took = time.monotonic() - sent
        reader.join(timeout=10)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 130, "".join(lines)[-3000:]
    assert took < 3, took
    said = [line.strip() for line in lines if "interrupt" in line.lower()]
    assert said == ["shardforge: interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort "
                    "without saving)", "shardforge: interrupted again: aborting without saving"], "".join(lines)
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "checkpoints" / "latest").exists()
