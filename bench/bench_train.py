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
Both report MFU through launcher.flops (one formula, dense bf16 peak, full attention matmuls; the
`MFU causal` column counts half of them, as a causal kernel computes) and peak memory as
torch.cuda.max_memory_allocated in GiB, and the GPU's median SM clock and mean power while each side ran
(bench/gpu_power.py: a board held at its power limit lowers its clock, which moves every row). The
table is printed, and the rows are written with the environment and the exact commands as one JSON
result (bench/results_io.py; `--out`, default under bench/results/).
"""
from __future__ import annotations

import argparse
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
from bench.results_io import REPO, environment, invocation, read_rows, write_result


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The children import launcher/ and bench/ from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def launch_command(run_dir: str | Path, *, model: str, device: str, seq_length: int, micro_batch_size: int,
                   steps: int, overrides: list[str] = (), nproc: int = 1, global_batch_size: int | None = None) -> list[str]:
    """The `launcher.train` command of a bench run: no wandb, progress or checkpoints; global batch
    micro batch x nproc unless given; `overrides` last, so they win."""
    launch = [sys.executable, "-m", "launcher.train"]
    if nproc > 1:  # one process per GPU; the layout comes from the overrides (parallel.tp=... etc.)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "launcher.train"]
    global_batch = global_batch_size or micro_batch_size * nproc
    return [*launch, f"model={model}", f"device={device}",
            f"train.seq_length={seq_length}", f"train.micro_batch_size={micro_batch_size}",
            f"train.global_batch_size={global_batch}", f"train.steps={steps}",
            "logging.wandb.mode=disabled", "logging.progress=false", "checkpoint.save_every=0",
            "checkpoint.final_save=false", f"run.dir={run_dir}", *overrides]


def shardforge_command(a: argparse.Namespace, run_dir: str, extra: list[str] = ()) -> list[str]:
    """launch_command of this bench's arguments, --sf-override then `extra`."""
    return launch_command(run_dir, model=a.model, device=a.device, seq_length=a.seq_length,
                          micro_batch_size=a.micro_batch_size, steps=a.steps, overrides=[*a.sf_override, *extra],
                          nproc=a.nproc, global_batch_size=a.global_batch_size)


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
    records = [r for r in records if r.get("type", "train") == "train"]  # not eval records
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
    out = Path(tempfile.mkdtemp(prefix="hf_bench_")) / "result.json"
    ok, text, power = _run(f"HF baseline ({variant})", hf_command(a, str(out), variant))
    return ({**read_rows(out)[0], **power} if ok else None), text


def causal_fraction(model: str, seq_length: int) -> float:
    """Share of launcher.flops' per-token FLOPs left when the attention matmuls count causally (half):
    MFU x this is the causal-only figure some reports quote."""
    from bench.hf_baseline import flops_shape, load_model_yaml
    from launcher.flops import train_flops_per_token

    shape = flops_shape(load_model_yaml(model))
    full = train_flops_per_token(seq_length=seq_length, **shape)
    head_dim = shape["kv_channels"] or shape["hidden_size"] // shape["num_attention_heads"]
    attention = 12 * shape["num_layers"] * shape["num_attention_heads"] * head_dim * seq_length
    return (full - attention / 2) / full


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| framework | tokens/s | MFU | MFU causal | peak mem (GiB) | step time (ms) | timed steps "
             "| loss first → last | SM clock, power (power-capped) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        losses = r.get("losses") or []
        loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "n/a"
        step_ms = None if r.get("step_time_s") is None else r["step_time_s"] * 1e3
        power = (f"{r['sm_clock_mhz']:.0f} MHz, {r['power_w']:.0f} W ({r['power_capped']:.0%})"
                 if "sm_clock_mhz" in r else "n/a")
        lines.append(f"| {r['framework']} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.1%')} | "
                     f"{_fmt(r.get('mfu_causal'), '.1%')} | {_fmt(r['peak_mem_gb'], '.1f')} | {_fmt(step_ms, '.1f')} | {r['timed_steps']} | {loss} "
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


def summary_text(title: str, env: dict[str, Any], description: str, command: str, commands: list[str],
                 body: list[str]) -> str:
    """The printed summary of a run: heading with the device, what ran, the exact commands, the table."""
    return "\n".join([f"## {env['device']}" + (f" — {title}" if title else ""), "", description, "",
                      "Command:", "", "```", command, "```", "", "Subprocesses:", "", "```", *commands, "```", "",
                      *body, ""])


def describe(a: argparse.Namespace, env: dict[str, Any]) -> str:
    return (f"model `{a.model}`, seq {a.seq_length}, micro batch {a.micro_batch_size}, global batch "
            f"{a.global_batch_size or a.micro_batch_size * a.nproc}, {a.nproc} GPU(s), "
            f"{'bf16' if a.device == 'cuda' else 'fp32 (CPU smoke test)'}, {a.steps} steps of which the first "
            f"{a.warmup} are warmup and not timed. torch {env['torch']}, transformers {env['transformers']}, "
            f"megatron-core {env['megatron-core']}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["hf", "shardforge"], help="run one side only")
    p.add_argument("--peers", default="eager",
                   help="comma-separated HF variants to run next to ShardForge: eager, compile, liger")
    p.add_argument("--model", default="llama_1b_32k", help="conf/model/<name> (default: the dense bench shape)")
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
    p.add_argument("--label", default="", help="what this run compares, kept in the result and its heading")
    p.add_argument("--note", default="", help="a line kept in the result and printed under the table")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_train.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
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

    causal = causal_fraction(a.model, a.seq_length)
    for r in rows:
        r["mfu_causal"] = None if r["mfu"] is None else r["mfu"] * causal
    env = environment()
    command = invocation("bench.bench_train", argv)
    body = [table(rows), ""] + ([a.note, ""] if a.note else [])
    print("\n" + summary_text(a.label, env, describe(a, env), command, commands, body), flush=True)
    if not (a.no_record or failed):
        path = write_result(a.out, "train", command, rows, env, label=a.label, note=a.note, args=vars(a),
                            subprocesses=commands)
        print(f"[bench] wrote {path}", flush=True)
    if failed:
        print("[bench] a side failed: nothing recorded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
