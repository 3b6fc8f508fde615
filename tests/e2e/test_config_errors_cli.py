"""A bad config from the command line: exactly one stderr line `config error: <key>: <reason>`,
exit code 2, before any process group starts (no 'shardforge:' start-up line, no metrics). Every
rule itself is checked in-process: tests/unit/test_config_errors.py."""
from __future__ import annotations

from conftest import config_error_line, run_cli


def test_error_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("launcher.train", ["parallel.tp=3", f"run.dir={tmp_path}"], check=False, timeout=120)
    assert "must divide model.num_attention_heads=8" in config_error_line(proc, "parallel.tp")
    assert "shardforge:" not in proc.stdout  # never reached model/process-group construction
    assert not (tmp_path / "metrics.jsonl").exists()


def test_error_under_torchrun_names_the_key(tmp_path):
    # Every rank validates on its own, but torchrun stops the others once the first exits: how many
    # ranks print the line before that depends on scheduling, so at least one, and no run starts.
    proc = run_cli("launcher.train", ["parallel.tp=4", f"run.dir={tmp_path}"], nproc=2, check=False, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("config error: parallel: world size 2 is not divisible by tp*pp*cp = 4") >= 1
    assert "shardforge:" not in proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists()
