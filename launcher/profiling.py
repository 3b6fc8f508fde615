"""`logging.profile_steps=[start, end]`: torch.profiler over those optimizer steps (rank 0).

Writes `<run.dir>/profile/trace.json` (open in chrome://tracing or Perfetto) and
`<run.dir>/profile/ops.txt`, the ops sorted by device time (CPU time on CPU), so a slow step
can be read without a trace viewer.
"""
from __future__ import annotations

from pathlib import Path

import torch


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
        (self._out / "ops.txt").write_text(self._prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        print(f"profile of steps {self._range[0]}-{self._range[1]} in {self._out}", flush=True)
        self._prof = None
