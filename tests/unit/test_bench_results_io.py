"""bench/results_io.py: one JSON result per bench run (env, command, rows), never overwritten; bench_train
writes its rows through it."""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import tempfile
from pathlib import Path

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


def test_bench_train_writes_one_row_per_side(tmp_path, monkeypatch):
    """bench_train end to end with the child processes faked: ShardForge's row from its metrics.jsonl
    (timed steps only, tokens over time), the HF peer's row as its own result file holds it."""
    from bench import bench_train

    steps = [{"step": s, "loss": 10.0 - s, "tokens_per_s": tps, "step_time_s": t, "mfu": mfu}
             for s, tps, t, mfu in [(1, 10.0, 9.0, 0.1), (2, 300.0, 2.0, 0.5), (3, 100.0, 4.0, 0.2)]]
    hf_row = {"framework": "hf-eager", "tokens_per_s": 123.0, "mfu": 0.25, "peak_mem_gb": None,
              "step_time_s": 0.5, "timed_steps": 2, "losses": [9.0, 8.0]}

    def fake_run(label, cmd):
        arg = dict(a.split("=", 1) for a in cmd if "=" in a)
        if "launcher.train" in cmd:  # run.dir: the empty directory bench_train made for the run
            (Path(arg["run.dir"]) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
        else:
            results_io.write_result(arg["--out"], "hf", "python -m bench.hf_baseline", [hf_row])
        return True, " ".join(cmd), {}

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(bench_train, "_run", fake_run)
    out = tmp_path / "r.json"
    assert bench_train.main(["--device", "cpu", "--model", "llama_1b_32k", "--steps", "3", "--warmup", "1",
                             "--peers", "eager", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m bench.bench_train --device cpu")
    sf, hf = data["rows"]
    assert sf["framework"] == "shardforge" and sf["timed_steps"] == 2 and sf["losses"] == [9.0, 8.0, 7.0]
    assert abs(sf["tokens_per_s"] - (300.0 * 2 + 100.0 * 4) / 6) < 1e-9
    assert abs(sf["mfu"] - (0.5 * 2 + 0.2 * 4) / 6) < 1e-12
    assert abs(sf["mfu_causal"] - sf["mfu"] * causal_fraction("llama_1b_32k", 4096)) < 1e-12
    assert {k: hf[k] for k in hf_row} == hf_row
    assert len(data["subprocesses"]) == 2 and "launcher.train" in data["subprocesses"][0]
