"""Where the GPU waits: the idle gaps between kernels in a `logging.profile_steps` trace, each
with the host-side ops that were running when it began (what the GPU was waiting on).

    python -m bench.trace_gaps runs/x/profile/trace.json [--min-us 100]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def gaps(trace: Path, min_us: float) -> list[tuple[float, float, list[str]]]:
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy",
                                                                                      "gpu_memset") and "dur" in e)
    host = [(e["ts"], e["ts"] + e["dur"], e.get("name", "")) for e in events
            if e.get("cat") in ("cpu_op", "python_function", "user_annotation") and "dur" in e]
    out, end = [], kernels[0][1] if kernels else 0.0
    for start, stop in kernels[1:]:
        if start - end >= min_us:
            # innermost-last: the host ops spanning the gap's start, longest first
            active = sorted((h for h in host if h[0] <= end <= h[1]), key=lambda h: h[0])
            out.append((end, start - end, [h[2] for h in active][-6:]))
        end = max(end, stop)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--min-us", type=float, default=100.0)
    a = p.parse_args()
    found = gaps(a.trace, a.min_us)
    t0 = found[0][0] if found else 0.0
    for at, length, ops in found:
        print(f"+{(at - t0) / 1e3:9.2f} ms  idle {length / 1e3:6.2f} ms  host: {' > '.join(ops)}")
    print(f"{len(found)} gaps >= {a.min_us:.0f} us, {sum(g[1] for g in found) / 1e3:.2f} ms in all")


if __name__ == "__main__":
    main()
