"""Benchmark: ShardForge vs. HF transformers training the same model on one GPU.

    python -m bench.bench_train                      # both, llama_1b_32k, seq 4096, micro batch 2
    python -m bench.bench_train --only hf            # HF baseline only
    python -m bench.bench_train --only shardforge    # ShardForge only
    python -m bench.bench_train --peers eager,compile,liger   # every peer (liger-kernel travels as a wheel)

Each side runs in its own subprocess, so neither sees the other's memory:
  * ShardForge: `python -m launcher.train model=... device=cuda ...` with a temporary run.dir;
    its `metrics.jsonl` gives per-step tokens_per_s, mfu, step_time_s and peak_mem_gb. The first
    `--warmup` steps are dropped; tokens/s and MFU are taken over the rest as total tokens over total
    time (the time-weighted mean of the per-step values), peak memory as the max over all steps.
  * HF: `python -m bench.hf_baseline --variant=...` (LlamaForCausalLM, SDPA, bf16 params, fused
    AdamW, random tokens) eager, under torch.compile, or with liger-kernel's kernels, timed with
    CUDA events over the same number of steps after the same warmup.
Both report MFU through launcher.flops (one formula, dense bf16 peak) and peak memory as
torch.cuda.max_memory_allocated in GiB, and the GPU's median SM clock and mean power while each side ran
(bench/gpu_power.py: the H200 runs this shape at its power limit). The table is printed and appended to bench/RESULTS.md
with the date, device, versions and the exact commands.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.gpu_power import PowerSampler

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The children import launcher/ and bench/ from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def shardforge_command(a: argparse.Namespace, run_dir: str, extra: list[str] = ()) -> list[str]:
    launch = [sys.executable, "-m", "launcher.train"]
    if a.nproc > 1:  # one process per GPU; the layout comes from --sf-override parallel.tp=... etc.
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
                  "-m", "launcher.train"]
    global_batch = a.global_batch_size or a.micro_batch_size * a.nproc
    return [*launch, f"model={a.model}", f"device={a.device}",
            f"train.seq_length={a.seq_length}", f"train.micro_batch_size={a.micro_batch_size}",
            f"train.global_batch_size={global_batch}", f"train.steps={a.steps}",
            "logging.wandb.mode=disabled", "logging.progress=false", "checkpoint.save_every=0",
            "checkpoint.final_save=false", f"run.dir={run_dir}", *a.sf_override, *extra]


def hf_command(a: argparse.Namespace, out: str, variant: str) -> list[str]:
    cmd = [sys.executable, "-m", "bench.hf_baseline", f"--model={a.model}", f"--seq-length={a.seq_length}",
           f"--micro-batch-size={a.micro_batch_size}", f"--steps={a.steps}", f"--warmup={a.warmup}",
           f"--device={a.device}", f"--out={out}", f"--variant={variant}"]
    if a.hf_clip_grad:
        cmd.append(f"--clip-grad={a.hf_clip_grad}")
    return cmd


def summarize_metrics(path: Path, warmup: int) -> dict[str, Any]:
    """ShardForge's metrics.jsonl → the bench's numbers (steps after `warmup`)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise RuntimeError(f"{path} holds no steps")
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise RuntimeError(f"{path}: {len(records)} steps, none after warmup={warmup}")
    tokens = [r["tokens_per_s"] * r["step_time_s"] if "step_time_s" in r else None for r in timed]
    if all(t is not None for t in tokens):
        total_time = sum(r["step_time_s"] for r in timed)
        tokens_per_s = sum(tokens) / total_time
        mfu = (sum(r["mfu"] * r["step_time_s"] for r in timed) / total_time) if all("mfu" in r for r in timed) else None
        step_time = total_time / len(timed)
    else:  # no step_time_s: plain means of the per-step rates
        tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
        mfu = sum(r["mfu"] for r in timed) / len(timed) if all("mfu" in r for r in timed) else None
        step_time = None
    mems = [r["peak_mem_gb"] for r in records if r.get("peak_mem_gb") is not None]
    out = {"framework": "shardforge", "tokens_per_s": tokens_per_s, "mfu": mfu,
           "peak_mem_gb": max(mems) if mems else None, "step_time_s": step_time, "timed_steps": len(timed),
           "warmup_steps": warmup, "losses": [r["loss"] for r in records]}
    moe_keys = sorted(k for k in timed[-1] if k.startswith("moe_"))
    if moe_keys:  # MoE: expert load etc., mean over the timed steps
        out["moe"] = {k: sum(r[k] for r in timed) / len(timed) for k in moe_keys}
    return out


def _run(label: str, cmd: list[str]) -> tuple[bool, str, dict[str, Any]]:
    """Run one side of the bench in its own process; (succeeded, the command as text, the GPU's
    clock and power while it ran: bench/gpu_power.py, empty without nvidia-smi)."""
    text = shlex.join(cmd)
    print(f"\n[bench] {label}: {text}", flush=True)
    with PowerSampler() as power:
        rc = subprocess.run(cmd, cwd=REPO, env=_env()).returncode
    if rc != 0:
        print(f"[bench] {label} failed (exit {rc})", file=sys.stderr, flush=True)
    return rc == 0, text, power.summary or {}


def run_shardforge(a: argparse.Namespace, name: str = "shardforge",
                   extra: list[str] = ()) -> tuple[dict[str, Any] | None, str]:
    run_dir = tempfile.mkdtemp(prefix="shardforge_bench_")
    ok, text, power = _run(name, shardforge_command(a, run_dir, list(extra)))
    if not ok:
        return None, text
    return {**summarize_metrics(Path(run_dir) / "metrics.jsonl", a.warmup), **power, "framework": name}, text


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'compile:train.compile=true,train.recompute=null' -> ('shardforge-compile', [overrides])."""
    name, _, overrides = text.partition(":")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"--sf-variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return f"shardforge-{name}", re.split(r",(?![^\[]*\])", overrides)  # not the commas inside [a,b]


def run_hf_subprocess(a: argparse.Namespace, variant: str) -> tuple[dict[str, Any] | None, str]:
    fd, out = tempfile.mkstemp(prefix="hf_bench_", suffix=".json")
    os.close(fd)
    ok, text, power = _run(f"HF baseline ({variant})", hf_command(a, out, variant))
    return ({**json.loads(Path(out).read_text()), **power} if ok else None), text


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| framework | tokens/s | MFU | peak mem (GiB) | step time (ms) | timed steps | loss first → last "
             "| SM clock, power (power-capped) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        losses = r.get("losses") or []
        loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "n/a"
        step_ms = None if r.get("step_time_s") is None else r["step_time_s"] * 1e3
        power = (f"{r['sm_clock_mhz']:.0f} MHz, {r['power_w']:.0f} W ({r['power_capped']:.0%})"
                 if "sm_clock_mhz" in r else "n/a")
        lines.append(f"| {r['framework']} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.1%')} | "
                     f"{_fmt(r['peak_mem_gb'], '.1f')} | {_fmt(step_ms, '.1f')} | {r['timed_steps']} | {loss} "
                     f"| {power} |")
    for r in rows:
        if r.get("moe"):
            lines.append("\n" + r["framework"] + " MoE, mean over timed steps: " +
                         ", ".join(f"{k} {v:.4g}" for k, v in r["moe"].items()))
    ours = [r for r in rows if r["framework"].startswith("shardforge") and r["tokens_per_s"]]
    peers = [r for r in rows if not r["framework"].startswith("shardforge") and r["tokens_per_s"]]
    for sf in ours:
        others = peers if sf is not ours[0] else [r for r in rows if r is not sf and r["tokens_per_s"]]
        ratios = [f"{r['framework']} {sf['tokens_per_s'] / r['tokens_per_s']:.2f}×" for r in others]
        if ratios:
            lines.append(f"\n{sf['framework']} throughput over: " + ", ".join(ratios))
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """Device and versions, read after the children have exited (this process never held the GPU before)."""
    import importlib.metadata as md

    import torch

    info = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
            "torch": torch.__version__}
    for pkg in ("transformers", "megatron-core"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    return info


def results_block(title: str, env: dict[str, str], description: str, module: str, argv: list[str] | None,
                  commands: list[str], body: list[str]) -> str:
    """One RESULTS.md entry: dated heading with the device, what ran, the exact commands, the table."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    invocation = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    return "\n".join([f"## {date} — {env['device']}" + (f" — {title}" if title else ""), "", description, "",
                      "Command:", "", "```", invocation, "```", "", "Subprocesses:", "", "```", *commands, "```", "",
                      *body, ""])


def report(text: str, record: bool) -> None:
    """Print a results entry and (record=True) append it to bench/RESULTS.md."""
    print("\n" + text, flush=True)
    if not record:
        return
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/ (each says what it measures "
                           "and how).\n\n")
    with RESULTS.open("a") as f:
        f.write(text + "\n")
    print(f"[bench] appended to {RESULTS.relative_to(REPO)}", flush=True)


def record(a: argparse.Namespace, rows: list[dict[str, Any]], commands: list[str], env: dict[str, str]) -> str:
    description = (f"model `{a.model}`, seq {a.seq_length}, micro batch {a.micro_batch_size}, global batch "
                   f"{a.global_batch_size or a.micro_batch_size * a.nproc}, {a.nproc} GPU(s), "
                   f"{'bf16' if a.device == 'cuda' else 'fp32 (CPU smoke test)'}, {a.steps} steps of which the first "
                   f"{a.warmup} are warmup and not timed. torch {env['torch']}, transformers {env['transformers']}, "
                   f"megatron-core {env['megatron-core']}.")
    body = [table(rows), ""] + ([a.note, ""] if a.note else [])
    return results_block(a.label, env, description, "bench.bench_train", None, commands, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["hf", "shardforge"], help="run one side only")
    p.add_argument("--peers", default="eager",
                   help="comma-separated HF variants to run next to ShardForge: eager, compile, liger")
    p.add_argument("--model", default="llama_1b_32k", help="conf/model/<name> (default: the issue-8 shape)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x nproc")
    p.add_argument("--nproc", type=int, default=1,
                   help="GPUs for ShardForge (torchrun); layouts via --sf-override parallel.tp=2 ...; "
                        "the HF peers are single-GPU and are skipped when nproc > 1")
    p.add_argument("--steps", type=int, default=40, help="steps per side, warmup included")
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of the averages")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    p.add_argument("--hf-clip-grad", type=float, default=None, help="clip grads in the HF baseline too")
    p.add_argument("--sf-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the ShardForge run (repeatable)")
    p.add_argument("--sf-variant", action="append", default=[], type=parse_variant, metavar="NAME:KEY=VALUE,...",
                   help="another ShardForge row with these overrides on top of --sf-override (repeatable); "
                        "ratios are taken against the first ShardForge row")
    p.add_argument("--label", default="", help="added to the RESULTS.md heading, e.g. 'HF-only validation run'")
    p.add_argument("--note", default="", help="a line added under the table in RESULTS.md")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    p.add_argument("--json-out", help="also write all results as JSON to this file")
    a = p.parse_args(argv)
    if a.steps - a.warmup < 20:
        print(f"[bench] warning: only {a.steps - a.warmup} timed steps (>= 20 recommended)", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    commands: list[str] = []
    failed = False
    sides = [("shardforge", run_shardforge)]
    sides += [("shardforge", functools.partial(run_shardforge, name=n, extra=o)) for n, o in a.sf_variant]
    if a.nproc == 1:
        sides += [("hf", functools.partial(run_hf_subprocess, variant=v)) for v in a.peers.split(",") if v]
    for side, fn in sides:
        if a.only and a.only != side:
            continue
        result, cmd = fn(a)
        commands.append(cmd)
        if result is None:
            failed = True
        else:
            rows.append(result)

    env = environment()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"env": env, "results": rows, "commands": commands}, indent=1) + "\n")
    report(record(a, rows, commands, env), record=not (a.no_record or failed))
    if failed:
        print("[bench] a side failed: nothing recorded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
