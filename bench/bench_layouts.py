"""Benchmark: parallel layouts on several GPUs of one host, through ShardForge only.

    python -m bench.bench_layouts --preset 2gpu      # bench model: 1 GPU, dp=2, tp=2, pp=2; MoE: 1 GPU, ep=2
    python -m bench.bench_layouts --preset 8gpu      # llama3_8b, seq 8192: tp2 pp2 dp2, tp4 dp2, pp4 vpp2 dp2, dp8
    python -m bench.bench_layouts --preset moe       # qwen3_30b_a3b shape (12 layers): ep=4, ep=8
    python -m bench.bench_layouts --preset scaling   # dp = 1, 2, 4, 8 (weak scaling) + a plot when matplotlib imports
    python -m bench.bench_layouts --preset 2gpu --device cpu --gpus 2 --model tiny --moe-model mixtral_tiny \\
        --seq-length 64 --steps 4 --warmup 1 --no-record                        # smoke test on CPU (gloo)

Every row is one `launcher.train` run (torchrun with one process per GPU when it uses more than
one), timed from its metrics.jsonl after the warmup steps like bench/bench_train.py. Reported per
row: tokens/s, tokens/s per GPU, MFU (per GPU, launcher.flops), peak memory, and the scaling
efficiency against the 1-GPU row of the same model (tokens/s ÷ (GPUs × 1-GPU tokens/s)).
Rows that need more GPUs than the host has are listed as not run. Each row's global batch is
`--global-batch-size` (presets: the same for every layout of a model; `scaling` keeps the per-GPU
batch instead), so pipeline layouts get micro batches to fill their stages. The table is printed and
the rows are written as one JSON result (bench/results_io.py; `--out`, default under bench/results/),
with the `scaling` preset's plot beside it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_train import _run, launch_command, summarize_metrics, summary_text
from bench.results_io import environment, invocation, write_result


@dataclass
class Row:
    name: str
    gpus: int
    overrides: list[str] = field(default_factory=list)
    moe: bool = False              # runs --moe-model instead of --model
    global_batch: int | None = None  # None: --global-batch-size


def preset_rows(preset: str, micro_batch: int) -> list[Row]:
    if preset == "2gpu":
        return [Row("1 GPU", 1), Row("dp=2", 2), Row("tp=2", 2, ["parallel.tp=2"]), Row("pp=2", 2, ["parallel.pp=2"]),
                Row("MoE 1 GPU", 1, moe=True), Row("MoE ep=2", 2, ["parallel.ep=2"], moe=True)]
    if preset == "8gpu":
        return [Row("tp=2 pp=2 dp=2", 8, ["parallel.tp=2", "parallel.pp=2"]), Row("tp=4 dp=2", 8, ["parallel.tp=4"]),
                Row("pp=4 vpp=2 dp=2", 8, ["parallel.pp=4", "parallel.vpp=2"]), Row("dp=8", 8)]
    if preset == "moe":
        return [Row("ep=4 dp=4", 4, ["parallel.ep=4"], moe=True), Row("ep=8 dp=8", 8, ["parallel.ep=8"], moe=True)]
    if preset == "scaling":
        return [Row(f"dp={n}", n, global_batch=micro_batch * n) for n in (1, 2, 4, 8)]
    raise ValueError(f"unknown preset {preset!r} (2gpu | 8gpu | moe | scaling)")


PRESET_DEFAULTS = {  # model, seq length, micro batch, global batch
    "2gpu": ("llama_1b_32k", 4096, 2, 8),
    "8gpu": ("llama3_8b", 8192, 1, 16),
    "moe": ("llama_1b_32k", 4096, 1, 16),
    "scaling": ("llama_1b_32k", 4096, 2, None),
}


def available_gpus(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0


def run_row(a: argparse.Namespace, row: Row) -> tuple[dict[str, Any] | None, str]:
    model = a.moe_model if row.moe else a.model
    overrides = [*(a.moe_override if row.moe else []), *row.overrides, *a.sf_override]
    run_dir = tempfile.mkdtemp(prefix="shardforge_layouts_")
    command = launch_command(run_dir, model=model, device=a.device, seq_length=a.seq_length,
                             micro_batch_size=a.micro_batch_size, steps=a.steps, overrides=overrides, nproc=row.gpus,
                             global_batch_size=row.global_batch or a.global_batch_size)
    ok, text, _ = _run(f"{row.name} ({model})", command)
    return (summarize_metrics(Path(run_dir) / "metrics.jsonl", a.warmup) if ok else None), text


def table(results: list[tuple[Row, dict[str, Any] | None, str]], a: argparse.Namespace) -> list[str]:
    baseline = {row.moe: r["tokens_per_s"] for row, r, _ in results if r and row.gpus == 1}  # per model kind
    lines = ["| layout | model | GPUs | tokens/s | tokens/s/GPU | MFU | peak mem (GiB) | efficiency vs 1 GPU | loss first → last |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row, r, note in results:
        model = a.moe_model if row.moe else a.model
        if r is None:
            lines.append(f"| {row.name} | {model} | {row.gpus} | {note} | | | | | |")
            continue
        base = baseline.get(row.moe)
        eff = f"{r['tokens_per_s'] / (row.gpus * base):.1%}" if base and row.gpus > 1 else "n/a"
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        lines.append(f"| {row.name} | {model} | {row.gpus} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / row.gpus:,.0f} | "
                     f"{mfu} | {mem} | {eff} | {r['losses'][0]:.3f} → {r['losses'][-1]:.3f} |")
        if r.get("moe"):
            lines.append(f"| | {row.name} MoE, mean over timed steps: " +
                         ", ".join(f"{k} {v:.4g}" for k, v in r["moe"].items()) + " | | | | | | | |")
    return lines


def plot_scaling(results: list[tuple[Row, dict[str, Any] | None, str]], path: Path) -> str:
    """tokens/s against GPUs with the ideal line; a note instead when matplotlib is missing."""
    points = [(row.gpus, r["tokens_per_s"]) for row, r, _ in results if r]
    if len(points) < 2:
        return "(no plot: fewer than two rows ran)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no plot: matplotlib is not installed)"
    gpus, tps = zip(*points)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(gpus, tps, "o-", label="ShardForge")
    ax.plot(gpus, [tps[0] * g / gpus[0] for g in gpus], "--", color="grey", label="linear")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(list(gpus))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESET_DEFAULTS))
    p.add_argument("--model", help="dense model (default: the preset's)")
    p.add_argument("--moe-model", default="qwen3_30b_a3b", help="MoE model of the MoE rows")
    p.add_argument("--moe-override", action="append", default=None, metavar="KEY=VALUE",
                   help="overrides of the MoE rows (default: model.num_layers=12)")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    p.add_argument("--gpus", type=int, help="processes available (default: the host's GPU count)")
    p.add_argument("--sf-override", action="append", default=[], metavar="KEY=VALUE", help="added to every row")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_layouts-<preset>.json; "
                                 "never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    a = p.parse_args(argv)
    model, seq, micro, global_batch = PRESET_DEFAULTS[a.preset]
    a.model = a.model or model
    a.seq_length = a.seq_length or seq
    a.micro_batch_size = a.micro_batch_size or micro
    a.global_batch_size = a.global_batch_size or global_batch
    a.moe_override = ["model.num_layers=12"] if a.moe_override is None else a.moe_override
    gpus = a.gpus if a.gpus is not None else available_gpus(a.device)

    results, commands = [], []
    for row in preset_rows(a.preset, a.micro_batch_size):
        if row.gpus > gpus:
            results.append((row, None, f"not run: needs {row.gpus} GPUs, the host has {gpus}"))
            continue
        r, cmd = run_row(a, row)
        commands.append(cmd)
        results.append((row, r, "failed (see the log)" if r is None else ""))

    env = environment()
    description = (f"preset `{a.preset}`: model `{a.model}` (MoE rows `{a.moe_model}` {' '.join(a.moe_override)}), "
                   f"seq {a.seq_length}, micro batch {a.micro_batch_size}, global batch "
                   f"{a.global_batch_size or 'micro batch × GPUs'}, {a.steps} steps ({a.warmup} untimed), "
                   f"{gpus} GPU(s) on the host. torch {env['torch']}, megatron-core {env['megatron-core']}.")
    command = invocation("bench.bench_layouts", argv)
    print("\n" + summary_text(f"layouts, preset {a.preset}", env, description, command, commands,
                              table(results, a)), flush=True)
    if not a.no_record:
        rows = [{"layout": row.name, "model": a.moe_model if row.moe else a.model, "gpus": row.gpus,
                 "overrides": row.overrides, "status": note or "ran", **(r or {})} for row, r, note in results]
        path = write_result(a.out, f"layouts-{a.preset}", command, rows, env, args=vars(a), subprocesses=commands)
        print(f"[bench] wrote {path}", flush=True)
        if a.preset == "scaling":
            print(plot_scaling(results, path.with_suffix(".png")), flush=True)
    return 0 if all(r is not None or note.startswith("not run") for _, r, note in results) else 1


if __name__ == "__main__":
    sys.exit(main())
