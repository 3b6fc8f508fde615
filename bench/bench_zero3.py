"""Benchmark: the largest Llama-shaped model that trains on one GPU, megatron engine vs DeepSpeed
ZeRO-3 with parameters and optimizer state offloaded to CPU memory.

    python -m bench.bench_zero3                                   # llama3_8b shape, growing depth, seq 2048
    python -m bench.bench_zero3 --model tiny --megatron-layers 2,4 --zero-layers 2,4 --device cpu \
        --seq-length 128 --no-record                              # smoke test

For each engine, the model's depth (`model.num_layers`) grows through its list (`--megatron-layers`,
`--zero-layers`) until a run fails (out of memory) or passes `--run-timeout`; every run is
`python -m launcher.train` in its own process. Reported per engine:
the deepest model that trained, its parameter count, tokens/s over the steps after warmup, peak GPU
memory (torch max allocated, from metrics.jsonl) and peak CPU memory (resident set of the run's
process tree, sampled by this script), and the ratio of the two engines' largest models. The table
is printed and the rows are written as one JSON result (bench/results_io.py; `--out`, default under
bench/results/).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from omegaconf import OmegaConf

from bench.bench_train import _env, summarize_metrics, summary_text
from bench.results_io import REPO, environment, invocation, write_result
from launcher.flops import matmul_params

ENGINES = {
    "megatron": [],
    "zero3-offload": ["parallel.engine=deepspeed", "parallel.zero.offload_params=cpu",
                      "parallel.zero.offload_optimizer=cpu"],
}


def param_count(model: str, layers: int) -> int:
    m = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
    n = matmul_params(num_layers=layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                      num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                      vocab_size=m.vocab_size, kv_channels=m.kv_channels)
    embedding = 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size
    return n + embedding + layers * 2 * m.hidden_size + m.hidden_size  # + norms


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
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds before a run counts as failed")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_zero3.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="shardforge_zero3_"))
    rows, commands = [], []
    for engine, overrides in ENGINES.items():
        best: dict[str, Any] | None = None
        depths = a.megatron_layers if engine == "megatron" else a.zero_layers
        for layers in (int(x) for x in depths.split(",")):
            run_dir = work / f"{engine}_{layers}"
            cmd = [sys.executable, "-m", "launcher.train", f"model={a.model}", f"model.num_layers={layers}",
                   f"device={a.device}", f"train.seq_length={a.seq_length}",
                   f"train.micro_batch_size={a.micro_batch_size}", f"train.global_batch_size={a.micro_batch_size}",
                   f"train.steps={a.steps}", "logging.wandb.mode=disabled", "logging.progress=false",
                   "checkpoint.save_every=0", "checkpoint.final_save=false", f"run.dir={run_dir}", *overrides]
            print(f"[bench] {engine} layers={layers}: {shlex.join(cmd)}", flush=True)
            rc, cpu_gb = run_once(cmd, a.run_timeout)
            if rc != 0:
                break
            best = {"engine": engine, "layers": layers, "params": param_count(a.model, layers), "peak_cpu_gb": cpu_gb,
                    **summarize_metrics(run_dir / "metrics.jsonl", a.warmup), "command": shlex.join(cmd)}
            commands.append(shlex.join(cmd))
        if best:
            rows.append(best)

    lines = ["| engine | deepest that trained | params | tokens/s | peak GPU mem (GiB) | peak CPU RSS (GiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gpu = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        lines.append(f"| {r['engine']} | {r['layers']} layers | {r['params'] / 1e9:.2f}B | {r['tokens_per_s']:,.0f} | "
                     f"{gpu} | {r['peak_cpu_gb']:.1f} |")
    if len(rows) == 2:
        lines.append(f"\nZeRO-3 + offload / megatron, largest model: {rows[1]['params'] / rows[0]['params']:.2f}×")
    env = environment()
    description = (f"`{a.model}` layer shape, depths megatron {a.megatron_layers} / ZeRO-3 {a.zero_layers}, seq {a.seq_length}, micro batch {a.micro_batch_size}, "
                   f"{a.steps} steps ({a.warmup} untimed). torch {env['torch']}, megatron-core {env['megatron-core']}.")
    command = invocation("bench.bench_zero3", argv)
    print("\n" + summary_text("largest model: megatron vs ZeRO-3 + CPU offload", env, description, command,
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
