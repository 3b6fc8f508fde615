"""bench/results_io.py: one JSON result per bench run (env, command, rows), never overwritten."""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json

import torch

from bench import results_io
from bench.bench_train import causal_fraction
from bench.hf_baseline import flops_shape, load_model_yaml
from launcher.flops import train_flops_per_token

WHEN = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)  # a fixed date, not the run's
ROWS = [{"framework": "shardforge", "tokens_per_s": 1234.5, "losses": [10.7, 9.1]},
        {"framework": "hf-liger", "tokens_per_s": 1000.0, "mfu": None}]


def test_result_holds_env_command_and_rows(tmp_path):
    path = results_io.write_result(tmp_path / "r.json", "train", "python -m bench.bench_train --steps 3", ROWS,
                                   note="smoke")
    assert path == tmp_path / "r.json"
    data = json.loads(path.read_text())
    assert data["bench"] == "train" and data["command"] == "python -m bench.bench_train --steps 3"
    assert data["rows"] == ROWS and data["note"] == "smoke"
    env = data["env"]
    assert env["torch"] == md.version("torch") and env["megatron-core"] == md.version("megatron-core")
    assert env["transformers"] == md.version("transformers")
    assert env["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    assert "driver" in env
    age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(env["date"])
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=5)
    assert results_io.read_rows(path) == ROWS


def test_an_existing_result_is_never_overwritten(tmp_path):
    env = {"date": WHEN.isoformat(), "device": "NVIDIA H200"}
    first = results_io.write_result(tmp_path / "r.json", "train", "cmd one", ROWS[:1], env)
    before = first.read_bytes()
    second = results_io.write_result(tmp_path / "r.json", "train", "cmd two", ROWS[1:], env)
    third = results_io.write_result(tmp_path / "r.json", "train", "cmd three", ROWS, env)
    assert [second.name, third.name] == ["r-2.json", "r-3.json"]
    assert first.read_bytes() == before
    assert [json.loads(p.read_text())["command"] for p in (first, second, third)] == ["cmd one", "cmd two",
                                                                                      "cmd three"]


def test_default_path_names_date_device_and_bench(tmp_path, monkeypatch):
    monkeypatch.setattr(results_io, "RESULTS_DIR", tmp_path / "results")
    env = {"date": WHEN.isoformat(), "device": "NVIDIA H100 80GB HBM3"}
    path = results_io.write_result(None, "layouts-2gpu", "cmd", ROWS, env)
    assert path == tmp_path / "results" / f"{WHEN.date().isoformat()}_nvidia-h100-80gb-hbm3_layouts-2gpu.json"
    assert results_io.write_result(None, "layouts-2gpu", "cmd", ROWS, env).name.endswith("layouts-2gpu-2.json")


def test_causal_fraction_halves_the_attention_flops():
    """Reference: the attention matmuls are what launcher.flops adds over a zero-length sequence."""
    shape = flops_shape(load_model_yaml("llama_1b_32k"))
    full = train_flops_per_token(seq_length=4096, **shape)
    attention = full - train_flops_per_token(seq_length=0, **shape)
    assert attention > 0
    assert abs(causal_fraction("llama_1b_32k", 4096) - (full - attention / 2) / full) < 1e-12
