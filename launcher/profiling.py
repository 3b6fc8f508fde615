"""`logging.profile_steps=[start, end]`: torch.profiler over those optimizer steps (rank 0).

Writes `<run.dir>/profile/trace.json` (open in chrome://tracing or Perfetto) and
`<run.dir>/profile/ops.txt`, the ops sorted by device time (CPU time on CPU), so a slow step
can be read without a trace viewer. On GPU, ops.txt starts with how busy the GPU was over the
profiled span (kernel time vs. wall time: the gap is launch overhead / host stalls) and the
kernel time by kind (GEMM, attention, optimizer, other).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

KERNEL_KINDS = (("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|grouped_mm", re.I)),
                ("attention", re.compile(r"cudnn|flash|fmha|attention|sdpa", re.I)),
                ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)))


def gpu_busy_summary(trace_path: Path) -> str:
    """GPU kernel time vs. the wall-clock span of the trace, and kernel time per kind."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e.get("name", "")) for e in events
                     if e.get("cat") == "kernel" and "dur" in e)
    if not kernels:
        return ""
    busy, end = 0.0, kernels[0][0]
    by_kind: dict[str, float] = {}
    for start, stop, name in kernels:
        busy += max(0.0, stop - max(start, end))  # union of intervals (streams may overlap)
        end = max(end, stop)
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(name)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + (stop - start)
    span = end - kernels[0][0]
    kinds = ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    return (f"GPU busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms span ({100 * busy / span:.1f}%); "
            f"kernel time: {kinds}\n\n")


class StepProfiler:
    def __init__(self, steps: list[int] | None, run_dir: str, device: torch.device, enabled: bool = True):
        self._range = tuple(steps) if steps and enabled else None
        self._out = Path(run_dir) / "profile"
        self._device = device
        self._prof: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        """`step` is the 1-based number of the step about to run."""
        if self._range and step == self._range[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self._device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is None or step < self._range[1]:
            return
        self._prof.__exit__(None, None, None)
        self._out.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self._out / "trace.json"))
        sort = "self_device_time_total" if self._device.type == "cuda" else "self_cpu_time_total"
        summary = gpu_busy_summary(self._out / "trace.json") if self._device.type == "cuda" else ""
        (self._out / "ops.txt").write_text(summary + self._prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        print(f"profile of steps {self._range[0]}-{self._range[1]} in {self._out}", flush=True)
        self._prof = None
