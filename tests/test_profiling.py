"""`logging.profile_steps`: torch.profiler over the chosen steps, written to run.dir/profile."""
from __future__ import annotations

import json

from conftest import FAST, config_error_line, run_cli


def test_profile_steps_writes_trace_and_op_table(tmp_path, cache_env):
    run_cli("launcher.train", [*FAST, "train.steps=3", "logging.profile_steps=[2,3]", f"run.dir={tmp_path}",
                               "checkpoint.final_save=false"])
    ops = (tmp_path / "profile" / "ops.txt").read_text()
    assert "aten::mm" in ops or "aten::addmm" in ops  # the model's matmuls were recorded
    events = json.loads((tmp_path / "profile" / "trace.json").read_text())["traceEvents"]
    assert any(e.get("name") == "aten::scaled_dot_product_attention" for e in events)


def test_bad_profile_steps_is_one_config_error(tmp_path):
    proc = run_cli("launcher.train", ["logging.profile_steps=[5,2]", f"run.dir={tmp_path}"], check=False)
    config_error_line(proc, "logging.profile_steps")


def test_gpu_busy_summary_counts_overlapping_kernels_once(tmp_path):
    from launcher.profiling import gpu_busy_summary

    # Kernels on [0,10] and [5,15] (two streams) and [30,40]: busy 25 µs of a 40 µs span.
    events = [{"cat": "kernel", "ts": 0, "dur": 10, "name": "nvjet_tst_gemm"},
              {"cat": "kernel", "ts": 5, "dur": 10, "name": "cudnn_generated_fort_native_sdpa"},
              {"cat": "kernel", "ts": 30, "dur": 10, "name": "multi_tensor_apply_kernel<adam>"},
              {"cat": "cpu_op", "ts": 0, "dur": 100, "name": "aten::mm"}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    summary = gpu_busy_summary(trace)
    assert "(62.5%)" in summary
    assert "gemm 0.0 ms" in summary and "attention 0.0 ms" in summary and "optimizer 0.0 ms" in summary
