"""The convert/generate CLIs' front end as a user meets it: one error line naming the key and exit
status 2, `--help` listing a command's keys, nothing written by Hydra (the conversions themselves:
tests/e2e/test_hf_convert.py; the configs in-process: tests/unit/test_convert_generate_cli.py)."""
from __future__ import annotations

from conftest import REPO, run_cli


def test_bad_input_is_one_line_naming_the_key(tmp_path):
    proc = run_cli("launcher.generate", [f"checkpoint.load={tmp_path}", "prompt_ids=1"], check=False)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("generate: error: checkpoint.load: "), \
        proc.stderr
    assert not (REPO / "outputs").exists() and not list(tmp_path.iterdir())  # Hydra wrote nothing


def test_help_lists_the_command_s_keys():
    proc = run_cli("launcher.convert", ["export_hf", "--help"])
    keys = proc.stdout.split("Keys and their defaults")[1]  # after the module docstring: this command's keys
    assert "max_shard_size_mb: 2000" in keys and "hf_dir" not in keys
