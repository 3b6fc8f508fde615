"""A run never destroys another, in-process: checkpoint.load=auto resumes run.dir's own checkpoint;
a fresh start into a run.dir that holds a run is refused with one error naming run.dir, unless
run.overwrite=true moves that run aside (renamed, never deleted); a resumed run's metrics.jsonl
drops the steps it trains again (replaced whole); wandb keeps one run id per run (offline mode).
The resumed runs themselves: tests/dist/test_checkpoint.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher import checkpoint, run_dir
from launcher.config.validate import ConfigError, validate
from launcher.metrics import MetricsLogger
from conftest import wandb_run_ids
from test_config_errors import compose_config


def _write_metrics(directory: Path, steps: range) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in steps))


def _fake_checkpoint(root: Path, step: int) -> None:
    (root / checkpoint.iter_dir_name(step)).mkdir(parents=True)
    (root / checkpoint.iter_dir_name(step) / "metadata.json").write_text("{}")  # what marks a dist checkpoint
    (root / "latest").write_text(checkpoint.iter_dir_name(step) + "\n")


@pytest.fixture
def any_checkpoint_fits(monkeypatch):
    """The fake checkpoints here hold no model: skip the shape/engine checks (tested with real ones
    in tests/dist)."""
    monkeypatch.setattr(checkpoint, "check_compatible", lambda *a, **k: None)
    monkeypatch.setattr(checkpoint, "check_engine", lambda *a, **k: None)


def _validate(tmp_path: Path, *overrides: str):
    return validate(compose_config(f"run.dir={tmp_path / 'run'}", *overrides), 1, "cpu")


def _error(tmp_path: Path, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        _validate(tmp_path, *overrides)
    return err.value


def test_auto_is_the_default_and_resumes_the_run_s_own_checkpoint(tmp_path, any_checkpoint_fits):
    fresh = _validate(tmp_path)
    assert (fresh.config.checkpoint.load, fresh.resuming, fresh.start_step) == (None, False, 0)
    _write_metrics(tmp_path / "run", range(1, 6))
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 4)
    resumed = _validate(tmp_path)
    assert resumed.config.checkpoint.load == str(tmp_path / "run" / "checkpoints")
    assert (resumed.resuming, resumed.start_step) == (True, 4)
    # an explicit iter_* dir of the run's own checkpoints resumes too, from that step
    older = _validate(tmp_path, f"checkpoint.load={tmp_path / 'run' / 'checkpoints' / 'iter_0000004'}")
    assert (older.resuming, older.start_step) == (True, 4)


@pytest.mark.parametrize("load", ["auto", "null", "other"])
def test_a_fresh_start_into_a_run_dir_holding_a_run_is_refused(tmp_path, any_checkpoint_fits, load):
    _fake_checkpoint(tmp_path / "other", 2)
    _write_metrics(tmp_path / "run", range(1, 8))  # metrics only: killed before its first save
    load = str(tmp_path / "other") if load == "other" else load
    err = _error(tmp_path, f"checkpoint.load={load}")
    assert err.key == "run.dir"
    assert f"{tmp_path / 'run'} holds a run (7 steps)" in str(err) and "run.overwrite=true" in str(err)
    # with a checkpoint of its own the run can be resumed: the error says how
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 9)
    if load != "auto":
        err = _error(tmp_path, f"checkpoint.load={load}")
        assert "holds a run (9 steps); resume with checkpoint.load=auto, or pass run.overwrite=true" in str(err)
    # checkpoints alone are a run too
    (tmp_path / "run" / "metrics.jsonl").unlink()
    assert "holds a run (9 steps)" in str(_error(tmp_path, "checkpoint.load=null"))


def test_overwrite_starts_fresh_and_moves_the_previous_run_aside(tmp_path, any_checkpoint_fits):
    run, outside = tmp_path / "run", tmp_path / "ckpt_elsewhere"
    _write_metrics(run, range(1, 4))
    _fake_checkpoint(run / "checkpoints", 3)
    (run / "wandb_run_id").write_text("abc\n")
    for launch_file in (run / ".hydra" / "config.yaml", run / "slurm-7.out", run / "submit.sbatch"):
        launch_file.parent.mkdir(exist_ok=True)
        launch_file.write_text("this launch's")
    resolved = _validate(tmp_path, "run.overwrite=true")
    assert (resolved.config.checkpoint.load, resolved.resuming) == (None, False)
    with pytest.raises(ConfigError, match="run.overwrite: .* moves aside"):  # it cannot resume what it moves
        _validate(tmp_path, "run.overwrite=true", f"checkpoint.load={run / 'checkpoints'}")

    aside = run_dir.move_aside(run, run / "checkpoints")
    assert aside.parent == tmp_path and aside.name.startswith("run.")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl", "wandb_run_id"]
    assert (aside / "checkpoints" / "latest").read_text() == "iter_0000003\n"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "slurm-7.out", "submit.sbatch"]
    assert run_dir.previous_run(run, run / "checkpoints") is None
    _validate(tmp_path)  # the run dir takes a fresh start now

    # a checkpoint.dir outside run.dir goes to <checkpoint.dir>.<timestamp>; a second move the same
    # second gets a name of its own
    _fake_checkpoint(outside, 5)
    _write_metrics(run, range(1, 6))
    again = run_dir.move_aside(run, outside)
    assert again != aside and (again / "metrics.jsonl").is_file() and not outside.exists()
    (moved,) = tmp_path.glob("ckpt_elsewhere.*")
    assert (moved / "latest").read_text() == "iter_0000005\n"


def test_resumed_metrics_drop_the_steps_trained_again(tmp_path):
    _write_metrics(tmp_path, range(1, 7))
    (tmp_path / "metrics.jsonl").open("a").write(json.dumps({"step": 6, "type": "eval", "loss": 1.0}) + "\n")
    inode = os.stat(tmp_path / "metrics.jsonl").st_ino
    assert run_dir.trim_metrics(tmp_path, 4) == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert os.stat(tmp_path / "metrics.jsonl").st_ino != inode  # replaced by a rename, not rewritten in place
    assert not list(tmp_path.glob("*.tmp"))
    assert run_dir.trim_metrics(tmp_path, 4) == 0


@pytest.fixture
def wandb_service():
    """The wandb-core service these in-process runs start, shut down afterwards: it would otherwise
    outlive the test and be inherited (WANDB_SERVICE) by every process this worker launches later."""
    import wandb

    yield
    wandb.teardown()
    os.environ.pop("WANDB_SERVICE", None)


def _logger(directory: Path, start_step: int) -> MetricsLogger:
    return MetricsLogger(directory, total_steps=6, start_step=start_step, progress=False, wandb_mode="offline",
                         wandb_project="shardforge-test", wandb_name=None, tensorboard=False, config={})


def test_metrics_and_wandb_continue_across_a_resume_and_start_anew_for_a_new_run(tmp_path, wandb_service):
    first = _logger(tmp_path / "a", 0)
    for step in (1, 2, 3):
        first.log({"step": step, "loss": 5.0, "tokens_per_s": 1.0})
    first.close()
    resumed = _logger(tmp_path / "a", 2)  # resumed from the step-2 checkpoint: step 3 is trained again
    for step in (3, 4):
        resumed.log({"step": step, "loss": 4.0, "tokens_per_s": 1.0})
    resumed.close()
    new_run = _logger(tmp_path / "b", 0)
    new_run.close()

    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    kept = (tmp_path / "a" / "wandb_run_id").read_text().strip()
    assert wandb_run_ids(tmp_path / "a") == [kept, kept]          # the resume continued the same wandb run
    assert wandb_run_ids(tmp_path / "b") == [(tmp_path / "b" / "wandb_run_id").read_text().strip()]
    assert wandb_run_ids(tmp_path / "b")[0] != kept               # a new run in another dir: a new id
    assert run_dir.wandb_run_id(tmp_path / "a", resuming=False) != kept  # a fresh start here: a new id too


def test_wandb_files_land_in_a_relative_run_dir_of_the_current_cwd(tmp_path, monkeypatch, wandb_service):
    # The wandb-core service, started here in one cwd, serves a run begun later in another cwd with a
    # relative run.dir (as a launch inheriting WANDB_SERVICE does): the files belong under that run.dir.
    _logger(tmp_path / "first", 0).close()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _logger(Path("runs") / "tiny", 0).close()
    assert list((tmp_path / "elsewhere" / "runs" / "tiny" / "wandb").glob("offline-run-*/run-*.wandb"))
