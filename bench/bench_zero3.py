"""Benchmark: the largest Llama-shaped model that trains on one GPU: the megatron engine, megatron with
its optimizer offloaded to CPU memory (optim.cpu_offload), and DeepSpeed ZeRO-3 with parameters and
optimizer state offloaded to CPU memory.

    python -m bench.bench_zero3                                   # llama3_8b shape, growing depth, seq 2048
    python -m bench.bench_zero3 --model tiny --megatron-layers 2,4 --offload-layers 2,4 --zero-layers 2,4 \
        --device cpu --seq-length 128 --no-record                 # smoke test

For each engine, the model's depth (`model.num_layers`) grows through its list (`--megatron-layers`,
`--offload-layers`, `--zero-layers`) until a run fails (out of memory) or passes `--run-timeout`;
every run is `python -m launcher.train` in its own process. Reported per engine: the deepest model
that trained, its parameter count, tokens/s and MFU over the steps after warmup, peak GPU memory
(torch max allocated, from metrics.jsonl), peak CPU memory (resident set of the run's process tree,
sampled by this script), and host bytes per parameter: that peak, and from the run's last metrics
record (launcher/host_memory.py) its resident set, torch's pinned host pool, and the exact bytes of
the optimizer state, parameter partitions and DeepSpeed buffers held in host memory, pinned and
pageable apart; then each engine's largest model over plain megatron's. The table is printed and
the rows are written as one JSON result (bench/results_io.py; `--out`, default under bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from omegaconf import OmegaConf

from bench.bench_train import _env, launch_command, summarize_metrics, summary_text
from bench.results_io import REPO, environment, invocation, write_result
from launcher.flops import matmul_params

ENGINES = {
    "megatron": [],
    "megatron-optim-offload": ["optim.cpu_offload=true"],
    "zero3-offload": ["parallel.engine=deepspeed", "parallel.zero.offload_params=cpu",
                      "parallel.zero.offload_optimizer=cpu"],
}
# metrics.jsonl's host memory fields (launcher/host_memory.py), reported as bytes per parameter
HOST_PARTS = [f"host_{part}_{kind}_gb" for part in ("state", "params", "buffers") for kind in ("pinned", "pageable")]


def param_count(model: str, layers: int) -> int:
    m = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
    n = matmul_params(num_layers=layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                      num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                      vocab_size=m.vocab_size, kv_channels=m.kv_channels)
    embedding = 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size
    return n + embedding + layers * 2 * m.hidden_size + m.hidden_size  # + norms


def host_bytes_per_param(metrics: Path, params: int) -> dict[str, float | None]:
    """The last step's host memory fields as bytes per parameter (`host_..._gb` -> `host_..._b_per_param`)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = [r for r in records if r.get("type", "train") == "train"][-1]
    return {key.replace("_gb", "_b_per_param"): (last[key] * 2**30 / params if key in last else None)
            for key in [*HOST_PARTS, "host_pinned_pool_gb", "host_rss_gb"]}


def run_once(cmd: list[str], timeout_s: float) -> tuple[int, float]:
    """Exit code (-9 when killed at the timeout) and peak resident memory (GiB) of the process tree."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent, peak, start = psutil.Process(proc.pid), 0, time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - start > timeout_s:
            for p in [*parent.children(recursive=True), parent]:
                p.kill()
            proc.wait()
            print(f"[bench] killed after {timeout_s:.0f} s", file=sys.stderr, flush=True)
            break
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.5)
    tail = proc.stderr.read()[-600:] if proc.returncode else ""
    if tail:
        print(f"[bench] exit {proc.returncode}: ...{tail}", file=sys.stderr, flush=True)
    return proc.returncode, peak / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_8b", help="conf/model/<name>: the layer shape")
    # Defaults bracket the limits of one 80 GB GPU on a 128 GiB host: megatron keeps ~18 B/param on the
    # GPU (bf16 weight, fp32 main grad, fp32 master, Adam m and v), ZeRO-3+offload the same in host memory.
    p.add_argument("--megatron-layers", default="8,12,14,16", help="depths to try with megatron, ascending")
    p.add_argument("--zero-layers", default="16,20,24,26", help="depths to try with ZeRO-3 + offload, ascending")
    # Optimizer offload keeps ~6 B/param on the GPU (bf16 weight, fp32 main grad) and ~16 in host
    # memory (fp32 master, Adam m and v, the gradient's host copy).
    p.add_argument("--offload-layers", default="16,20,24,28",
                   help="depths to try with megatron + optimizer CPU offload, ascending")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"which of {', '.join(ENGINES)} to run")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds before a run counts as failed")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="rows per optimizer step (gradient accumulation over micro batches); default: one micro batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sf-override", action="append", default=[], metavar="KEY=VALUE",
                   help="added to every run, after the engine's own settings (e.g. optim.main_grads_dtype=bf16)")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_zero3.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="shardforge_zero3_"))
    rows, commands = [], []
    depths = {"megatron": a.megatron_layers, "megatron-optim-offload": a.offload_layers, "zero3-offload": a.zero_layers}
    unknown = set(a.engines.split(",")) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ENGINES)})")
    for engine, overrides in ((e, o) for e, o in ENGINES.items() if e in a.engines.split(",")):
        best: dict[str, Any] | None = None
        for layers in (int(x) for x in depths[engine].split(",")):
            run_dir = work / f"{engine}_{layers}"
            cmd = launch_command(run_dir, model=a.model, device=a.device, seq_length=a.seq_length,
                                 micro_batch_size=a.micro_batch_size, steps=a.steps,
                                 global_batch_size=a.global_batch_size,
                                 overrides=[f"model.num_layers={layers}", *overrides, *a.sf_override])
            print(f"[bench] {engine} layers={layers}: {shlex.join(cmd)}", flush=True)
            rc, cpu_gb = run_once(cmd, a.run_timeout)
            if rc != 0:
                break
            params = param_count(a.model, layers)
            best = {"engine": engine, "layers": layers, "params": params, "peak_cpu_gb": cpu_gb,
                    "peak_cpu_b_per_param": cpu_gb * 2**30 / params,
                    **host_bytes_per_param(run_dir / "metrics.jsonl", params),
                    **summarize_metrics(run_dir / "metrics.jsonl", a.warmup), "command": shlex.join(cmd)}
            commands.append(shlex.join(cmd))
        if best:
            rows.append(best)

    def size(params: int) -> str:
        return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"

    def b(r: dict[str, Any], key: str) -> str:
        return "n/a" if r.get(key) is None else f"{r[key]:.1f}"

    lines = ["| engine | deepest that trained | params | tokens/s | MFU | peak GPU mem (GiB) | peak host RSS (GiB) | "
             "host B/param: peak RSS | RSS at end | pinned pool | state pinned / pageable | params pinned / pageable | "
             "buffers pinned / pageable |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gpu = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        parts = " | ".join(f"{b(r, f'host_{part}_pinned_b_per_param')} / {b(r, f'host_{part}_pageable_b_per_param')}"
                           for part in ("state", "params", "buffers"))
        lines.append(f"| {r['engine']} | {r['layers']} layers | {size(r['params'])} | {r['tokens_per_s']:,.0f} | "
                     f"{mfu} | {gpu} | {r['peak_cpu_gb']:.1f} | {b(r, 'peak_cpu_b_per_param')} | "
                     f"{b(r, 'host_rss_b_per_param')} | {b(r, 'host_pinned_pool_b_per_param')} | {parts} |")
    plain = next((r for r in rows if r["engine"] == "megatron"), None)
    for r in rows:
        if plain is not None and r is not plain:
            lines.append(f"\n{r['engine']} / megatron, largest model: {r['params'] / plain['params']:.2f}×")
    env = environment()
    # the pinned host allocator's settings (power-of-two rounding) change the host columns
    alloc = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    description = (f"`{a.model}` layer shape, depths " + " / ".join(f"{e} {d}" for e, d in depths.items()
                                                                     if e in a.engines.split(",")) +
                   f", seq {a.seq_length}, micro batch {a.micro_batch_size}, "
                   f"global batch {a.global_batch_size or a.micro_batch_size}, "
                   f"{a.steps} steps ({a.warmup} untimed)"
                   + (f", overrides {' '.join(a.sf_override)}" if a.sf_override else "")
                   + f". torch {env['torch']}, megatron-core {env['megatron-core']}."
                   + (f" PYTORCH_ALLOC_CONF={alloc}." if alloc else ""))
    command = invocation("bench.bench_zero3", argv)
    print("\n" + summary_text("largest model: megatron, megatron + optimizer offload, ZeRO-3 + CPU offload", env, description, command,
                              commands, lines), flush=True)
    if not rows:
        print("[bench] no engine trained any depth: nothing recorded", file=sys.stderr)
        return 1
    if not a.no_record:
        path = write_result(a.out, "zero3", command, rows, env, args=vars(a), subprocesses=commands)
        print(f"[bench] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
