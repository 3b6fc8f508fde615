"""bench/gpu_power.py's reading of nvidia-smi samples: only samples above half the power limit
count, unreadable fields are skipped, the SW power cap bit is read from the throttle mask."""
from bench.gpu_power import summarize


def test_busy_samples_only():
    lines = ["1980, 80.0, 700.00, 0x0000000000000001",   # idle (below half the limit): left out
             "1500, 690.0, 700.00, 0x0000000000000004",   # capped
             "1700, 650.0, 700.00, 0x0000000000000000",
             "1400, 700.0, 700.00, 0x0000000000000005",   # capped (and idle bit)
             "[N/A], [N/A], 700.00, 0x0"]
    got = summarize(lines)
    assert got == {"sm_clock_mhz": 1500.0, "power_w": (690.0 + 650.0 + 700.0) / 3, "power_capped": 2 / 3}


def test_no_busy_sample():
    assert summarize(["345, 79.4, 700.00, 0x0000000000000001", "garbage"]) is None
