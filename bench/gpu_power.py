"""SM clock and board power while one side of a benchmark runs.

A step that keeps the board at its power limit makes the driver lower the SM clock (throttle
reason "SW power cap"), by how much depends on how much work the kernels do per second. A
same-run ratio is then also a ratio of energy per token, and these columns say which regime a row
ran in. Sampled with `nvidia-smi -lms`; only
samples above half the power limit count (start-up, compilation and teardown draw far less).
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
from typing import Any

QUERY = "clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # nvmlClocksThrottleReasonSwPowerCap


def summarize(lines: list[str]) -> dict[str, Any] | None:
    """nvidia-smi csv,noheader,nounits lines of QUERY -> median SM clock (MHz), mean power (W) and the
    fraction of samples power-capped, over the samples drawing more than half the limit."""
    busy = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            clock, power, limit, reasons = float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3], 16)
        except ValueError:  # "[N/A]" and the like
            continue
        if power > 0.5 * limit:
            busy.append((clock, power, bool(reasons & SW_POWER_CAP)))
    if not busy:
        return None
    return {"sm_clock_mhz": statistics.median(c for c, _, _ in busy),
            "power_w": statistics.fmean(p for _, p, _ in busy),
            "power_capped": sum(capped for _, _, capped in busy) / len(busy)}


class PowerSampler:
    """`with PowerSampler() as s: ...` then `s.summary` (None without nvidia-smi or a busy sample)."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.summary: dict[str, Any] | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "PowerSampler":
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.interval_ms}", "--id=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.summary = summarize(out.splitlines())
