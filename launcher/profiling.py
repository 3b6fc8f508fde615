"""`logging.profile_steps=[start, end]`: torch.profiler over those optimizer steps (rank 0).

Writes `<run.dir>/profile/trace.json` (open in chrome://tracing or Perfetto) and
`<run.dir>/profile/ops.txt`, the ops sorted by device time (CPU time on CPU), so a slow step
can be read without a trace viewer. On GPU, ops.txt starts with how busy the GPU was over the
profiled span (kernel time vs. wall time: the gap is launch overhead / host stalls) and the
kernel time by kind (GEMM, attention, optimizer, other).

`logging.memory_snapshot=N`: the CUDA caching allocator's history from start-up to the end of
step N (rank 0) → `<run.dir>/memory/snapshot.pickle` (drag into https://pytorch.org/memory_viz)
and `<run.dir>/memory/peak.txt`: what was allocated at the peak, grouped by the line of model or
framework code that allocated it (the question a peak-memory number raises).
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

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


def record_memory_history(until_step: int | None, device: torch.device, enabled: bool = True) -> None:
    """Start recording CUDA allocations (with Python stacks) if `logging.memory_snapshot` is set;
    called before the model is built so weights and optimizer state carry their stacks too."""
    if until_step and enabled and device.type == "cuda":
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)


_REPO = str(Path(__file__).resolve().parent.parent) + "/"


def _site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame outside torch itself: the model / megatron / optimizer line that asked."""
    for f in frames:
        name = f["filename"]
        # torch's own package only: a venv under /opt/torch/ still holds transformers' and megatron's lines
        if not re.search(r"/(site|dist)-packages/torch/", name) and not name.startswith("<"):
            short = re.sub(r".*/(site-packages|dist-packages)/", "", name).removeprefix(_REPO)
            return f"{short}:{f['line']} {f['name']}"
    return "(torch internals)" if frames else "(no stack)"


def peak_report(snapshot: dict[str, Any], top: int = 30) -> str:
    """Replay device 0's allocation trace; list the blocks live at the highest point of allocated
    memory, by allocating site. Blocks allocated before recording began count as one baseline."""
    trace = snapshot["device_traces"][0] if snapshot["device_traces"] else []
    live_now = sum(b["size"] for seg in snapshot["segments"] for b in seg["blocks"]
                   if b["state"] == "active_allocated")
    live: dict[int, tuple[int, str]] = {}
    total = peak = peak_at = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _site(e.get("frames", [])))
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
                peak_live = dict(live)
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    # The trace's net change is what was allocated while recording; the rest of what is live
    # now was there before (allocator state at start-up).
    baseline = max(0, live_now - total)
    by_site: dict[str, list[int]] = {}
    for size, site in peak_live.values():
        count_bytes = by_site.setdefault(site, [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += size
    gib = 2**30
    lines = [f"peak allocated {(peak + baseline) / gib:.2f} GiB (trace event {peak_at} of {len(trace)}; "
             f"{baseline / gib:.2f} GiB allocated before recording began)", "",
             f"{'GiB':>8} {'blocks':>7}  allocated at"]
    for site, (count, size) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{size / gib:8.3f} {count:7d}  {site}")
    if peak_at < len(trace):
        lines += ["", "stack of the allocation that set the peak:"]
        lines += [f"  {f['filename']}:{f['line']} {f['name']}" for f in trace[peak_at].get("frames", [])[:25]]
    return "\n".join(lines) + "\n"


class MemorySnapshot:
    """Dumps the recorded history after step `until_step` and stops recording."""

    def __init__(self, until_step: int | None, run_dir: str, device: torch.device, enabled: bool = True):
        self._until = until_step if enabled and device.type == "cuda" else None
        self._out = Path(run_dir) / "memory"

    def after_step(self, step: int) -> None:
        if self._until is None or step != self._until:
            return
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        self._out.mkdir(parents=True, exist_ok=True)
        with open(self._out / "snapshot.pickle", "wb") as f:
            pickle.dump(snapshot, f)
        (self._out / "peak.txt").write_text(peak_report(snapshot))
        print(f"memory snapshot of steps 1-{step} in {self._out}", flush=True)
        self._until = None
