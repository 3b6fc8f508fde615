"""`logging.profile_steps`: torch.profiler over the chosen steps, written to run.dir/profile."""
from __future__ import annotations

import json

from conftest import FAST, NARROW, REPO, run_cli


def test_profile_steps_writes_trace_and_op_table(tmp_path, cache_env):
    run_cli("launcher.train", [*FAST, *NARROW, "train.steps=3", "logging.profile_steps=[2,3]", f"run.dir={tmp_path}",
                               "checkpoint.final_save=false"])
    ops = (tmp_path / "profile" / "ops.txt").read_text()
    assert "aten::mm" in ops or "aten::addmm" in ops  # the model's matmuls were recorded
    events = json.loads((tmp_path / "profile" / "trace.json").read_text())["traceEvents"]
    assert any(e.get("name") == "aten::scaled_dot_product_attention" for e in events)


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


def test_peak_report_lists_what_was_live_at_the_peak():
    from launcher.profiling import peak_report

    def frames(line):
        return [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
                {"filename": str(REPO / "models" / "llama.py"), "line": line, "name": "forward"}]

    mib = 2**20
    # a (4 MiB, line 10) and b (8 MiB, line 20) live together = 12 MiB; b freed; c (6 MiB) after a: 10 MiB.
    trace = [{"action": "alloc", "addr": 1, "size": 4 * mib, "frames": frames(10)},
             {"action": "alloc", "addr": 2, "size": 8 * mib, "frames": frames(20)},
             {"action": "free_requested", "addr": 2, "size": 8 * mib},
             {"action": "free_completed", "addr": 2, "size": 8 * mib},
             {"action": "alloc", "addr": 3, "size": 6 * mib, "frames": frames(30)}]
    # Live at the dump: a, c and a 2 MiB block from before recording began.
    blocks = [{"size": s, "state": "active_allocated"} for s in (4 * mib, 6 * mib, 2 * mib)]
    snapshot = {"device_traces": [trace], "segments": [{"blocks": blocks + [{"size": mib, "state": "inactive"}]}]}
    report = peak_report(snapshot)
    assert report.startswith(f"peak allocated {14 / 1024:.2f} GiB (trace event 1 of 5; {2 / 1024:.2f} GiB")
    rows = [line.split() for line in report.splitlines()[3:5]]
    assert rows[0][1:] == ["1", "models/llama.py:20", "forward"] and float(rows[0][0]) == round(8 / 1024, 3)
    assert rows[1][1:] == ["1", "models/llama.py:10", "forward"]
    assert "llama.py:30" not in report.split("stack of")[0]  # c came after the peak
