"""Bad configs fail from the command line with one line naming the key, before any process
group starts (so no 'shardforge:' start-up line and no torch.distributed output)."""
from __future__ import annotations

import pytest

from conftest import config_error_line, run_cli

CASES = [
    # overrides, key named in the message, words of the message
    (["parallel.tp=3"], "parallel.tp", "must divide model.num_attention_heads=8"),
    (["model.num_query_groups=2", "parallel.tp=4"], "parallel.tp", "must divide model.num_query_groups=2"),
    (["parallel.pp=3"], "parallel.pp", "must divide model.num_layers=4"),
    (["parallel.pp=2", "parallel.vpp=4"], "parallel.pp", "pp=2 x vpp=4 must divide model.num_layers=4"),
    (["parallel.tp=2"], "parallel", "world size 1 is not divisible by tp*pp*cp = 2"),
    (["parallel.dp=2"], "parallel.dp", "dp=2 but world size 1"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size",
     "6 must be divisible by micro_batch_size 4 x dp 1"),
    (["train.seq_length=4096"], "train.seq_length", "exceeds model.max_position_embeddings=2048"),
    (["parallel.engine=fsdp"], "parallel.engine", "unknown engine"),
    (["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load", "no checkpoint directory"),
    (["model.vocab_size=1000"], "model.vocab_size", "has 4096 tokens but model.vocab_size is 1000"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", "must be null or a positive integer"),
    (["train.recompute=[mlp,attention]"], "train.recompute", "got ['mlp', 'attention']"),
    (["model=qwen_moe_tiny", "train.recompute=[mlp_act]"], "train.recompute", "MoE experts: moe_act"),
    (["train.compile=yes"], "train.compile", "must be true or false"),
    (["train.compile=true", "train.recompute=[mlp]"], "train.compile", "does not trace under torch.compile"),
    (["train.compile=true", "model=mixtral_tiny"], "train.compile", "compiled layers are dense only"),
    (["train.precision=fp16"], "train.precision", "must be auto, bf16, fp32 or fp8"),
    (["train.precision=fp8", "model=mixtral_tiny"], "train.precision", "linears of dense models"),
    (["train.precision=fp8", "train.compile=true"], "train.precision", "set train.compile=false"),
    (["train.cuda_graph=maybe"], "train.cuda_graph", "must be auto, true or false"),
    (["train.cuda_graph=true", "device=cpu"], "train.cuda_graph", "needs device=cuda"),
]


@pytest.mark.parametrize("overrides,key,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_validation_error_is_one_line(overrides, key, words, tmp_path):
    proc = run_cli("launcher.train", [*overrides, f"run.dir={tmp_path}"], check=False, timeout=120)
    assert words in config_error_line(proc, key)
    assert "shardforge:" not in proc.stdout  # never reached model/process-group construction
    assert not (tmp_path / "metrics.jsonl").exists()


def test_error_under_torchrun_names_key_on_every_rank(tmp_path):
    proc = run_cli("launcher.train", ["parallel.tp=4", f"run.dir={tmp_path}"], nproc=2, check=False, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("config error: parallel: world size 2 is not divisible by tp*pp*cp = 4") == 2


def test_unknown_key_is_an_error(tmp_path):
    proc = run_cli("launcher.train", ["train.stepz=5", f"run.dir={tmp_path}"], check=False, timeout=120)
    assert proc.returncode != 0
    assert "train.stepz" in proc.stderr and "not in struct" in proc.stderr
