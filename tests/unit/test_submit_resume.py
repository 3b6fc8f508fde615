"""The sbatch script's resume lines (launcher/submit.py, slurm/job.sbatch), run by bash as Slurm's
batch node would: the first start takes the user's checkpoint.load and run.overwrite; a requeued
job resumes its own newest checkpoint, or, requeued before its first save, starts again with its
partial run moved aside (run.overwrite=true: refused otherwise, the run dir holds metrics)."""
from __future__ import annotations

import subprocess

import pytest

from launcher.submit import _resume


def _start(tmp_path, first_load, overwrite: bool, restarts: int, saved: bool) -> tuple[str, str]:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    if saved:
        (ckpt / "latest").write_text("iter_0000004\n")
    script = f'RESTARTS={restarts}\nCKPT_DIR={ckpt}\n{_resume(first_load, overwrite)}\necho "$LOAD $OVERWRITE"\n'
    load, overwrite = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                     check=True).stdout.split()
    return load, overwrite


@pytest.mark.parametrize("first_load,as_passed", [("auto", "auto"), (None, "null"), ("/ck/iter_0000002",
                                                                                       "/ck/iter_0000002")])
def test_first_start_takes_the_user_s_settings_and_a_requeue_continues_or_restarts(tmp_path, first_load, as_passed):
    assert _start(tmp_path, first_load, False, 0, saved=False) == (as_passed, "false")
    assert _start(tmp_path, first_load, True, 0, saved=False) == (as_passed, "true")
    # requeued before the first checkpoint: the same start again, the partial run moved aside
    assert _start(tmp_path, first_load, False, 1, saved=False) == (as_passed, "true")
    # requeued after a checkpoint: resume it, never move it aside (whatever the first start asked)
    assert _start(tmp_path, first_load, True, 2, saved=True) == ("auto", "false")
