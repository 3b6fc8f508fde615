"""Benchmark: LoRA SFT on one GPU, ShardForge LoRA vs ShardForge full-parameter vs transformers + peft.

    python -m bench.bench_lora                         # llama3_1b, seq 4096, micro batch 2, peer liger
    python -m bench.bench_lora --device cpu --model tiny --seq-length 256 --samples 200 --steps 3 \
        --warmup 1 --peers eager --no-record           # smoke test

The synthetic chat set of bench/bench_packed.py (lognormal turn lengths, `launcher.preprocess
format=sft`), trained three ways on the same preprocessed conversations:
  * ShardForge full-parameter SFT: `launcher.train data=indexed data.format=sft data.packing=true`;
  * ShardForge LoRA: the same + `train.peft=lora lora.rank=R lora.alpha=A lora.targets=[qkv,proj,fc1,fc2]`
    (every linear of the decoder layers; `train.cuda_graph=auto` leaves LoRA steps uncaptured);
  * transformers + peft (`--peers`, default liger; eager also runs on CPU): `python -m bench.hf_baseline
    --sft-data PREFIX --lora-rank R` (see there): LoRA of the same rank and alpha on q/k/v/o/gate/up/down,
    no dropout, only the adapters in the optimizer, each step at most micro_batch_size x seq_length
    positions, in both of transformers' usual layouts (`--peer-layouts`): conversations flattened with
    DataCollatorWithFlattening (no padding; SDPA under the block-causal mask transformers builds from
    the position ids) and a row per conversation right-padded to the step's longest (padding computed;
    SDPA's causal kernels).
The figures the issue asks for: peak memory of ShardForge LoRA over ShardForge full, and trained (loss)
tokens per second of ShardForge LoRA over the faster transformers + peft peer. Peak memory is
torch.cuda.max_memory_allocated. The rows go into one JSON result (bench/results_io.py; `--out`,
default under bench/results/).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_packed import add_peer_layouts, prepare_chat, run_sft_peers, sft_command, summarize
from bench.bench_train import _run, summary_text
from bench.results_io import environment, invocation, write_result

MEMORY_TARGET, SPEED_TARGET = 0.6, 1.2


def lora_ratios(full: dict[str, Any], lora: dict[str, Any], peer: dict[str, Any] | None) -> dict[str, float | None]:
    """ShardForge LoRA's peak memory over full-parameter ShardForge's (None without CUDA figures) and its
    trained and computed tokens per second over the peer's (None without a peer)."""
    mem = lora["peak_mem_gb"] / full["peak_mem_gb"] if lora.get("peak_mem_gb") and full.get("peak_mem_gb") else None
    return {"memory_lora_over_full": mem,
            "loss_tokens_per_s_over_peer": lora["loss_tokens_per_s"] / peer["loss_tokens_per_s"] if peer else None,
            "tokens_per_s_over_peer": lora["tokens_per_s"] / peer["tokens_per_s"] if peer else None}


def lora_command(a: argparse.Namespace, prefix: Path, tokenizer: str, run_dir: Path, lora: bool) -> list[str]:
    """A packed SFT run on the chat set at `prefix`, full-parameter or LoRA on every linear of the decoder
    layers; --sf-override last, so it wins."""
    peft = ["train.peft=lora", f"lora.rank={a.rank}", f"lora.alpha={a.alpha}", "lora.dropout=0.0",
            "lora.targets=[qkv,proj,fc1,fc2]"] if lora else []
    return sft_command(a, prefix, tokenizer, run_dir, True, [*peft, *a.sf_override])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_1b")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--peers", default="liger",
                   help="comma-separated transformers + peft variants (bench.hf_baseline --variant): liger, eager, "
                        "compile; empty for none. liger needs CUDA; eager smoke-tests on CPU")
    add_peer_layouts(p)
    p.add_argument("--peer-lora-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="the peer's adapter dtype (bench.hf_baseline --lora-dtype): fp32 is peft's default")
    p.add_argument("--sf-override", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override for both ShardForge runs (repeatable)")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_lora.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="shardforge_lora_"))
    tokenizer, prefix = prepare_chat(work, a.samples, a.seq_length)

    rows, commands = [], []
    for name, lora in (("ShardForge full", False), (f"ShardForge LoRA r{a.rank}", True)):
        run_dir = work / ("run_lora" if lora else "run_full")
        ok, text, power = _run(name, lora_command(a, prefix, tokenizer, run_dir, lora))
        commands.append(text)
        if not ok:
            return 1
        rows.append({"framework": name, **summarize(run_dir, a.warmup), **power})

    def peer_name(variant: str, layout: str) -> str:
        return f"transformers + peft r{a.rank} ({variant}, {layout})"

    peer_runs, peer_commands = run_sft_peers(
        a, prefix, work, peer_name,
        [f"--lora-rank={a.rank}", f"--lora-alpha={a.alpha}", f"--lora-dtype={a.peer_lora_dtype}"])
    commands += peer_commands
    failed = any(r is None for _, _, r, _ in peer_runs)
    rows += [{**r, **power, "framework": peer_name(variant, layout)} for variant, layout, r, power in peer_runs if r]

    full, lora, peers = rows[0], rows[1], rows[2:]
    # the target is against the peers' best
    best = max(peers, key=lambda r: r["loss_tokens_per_s"]) if peers else None
    ratios = lora_ratios(full, lora, best)
    env = environment()
    lines = ["| SFT run | trained tokens/s | tokens/s | step (ms) | peak mem (GiB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mem = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        lines.append(f"| {r['framework']} | {r['loss_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_time_s'] * 1e3:.1f} | {mem} |")
    mem = ratios["memory_lora_over_full"]
    lines.append(f"\nShardForge LoRA / full, peak memory: {'n/a' if mem is None else f'{mem:.2f}×'} "
                 f"(target ≤ {MEMORY_TARGET})")
    for r in peers:
        each = lora_ratios(full, lora, r)
        lines.append(f"\nShardForge LoRA / {r['framework']}, trained tokens per second: "
                     f"{each['loss_tokens_per_s_over_peer']:.2f}× (target ≥ {SPEED_TARGET}); tokens per second: "
                     f"{each['tokens_per_s_over_peer']:.2f}×")
    lines.append("\ntrained tokens/s: tokens with a loss; tokens/s: every position computed (ShardForge's packed rows "
                 "of seq_length with what they leave unfilled; the packed peer's flattened batch without padding, the "
                 "padded peer's rows with their padding).")
    description = (f"model `{a.model}`, SFT, seq {a.seq_length}, micro batch {a.micro_batch_size} packed rows "
                   f"(global batch = micro batch; the peers: at most {a.micro_batch_size * a.seq_length} "
                   f"positions a step, one flattened batch or a padded row per conversation), LoRA rank {a.rank}, alpha {a.alpha:g}, "
                   f"no dropout, on every linear of the decoder layers (ShardForge: one adapter on each fused "
                   f"linear, qkv and gate/up; peft: one on each of q, k, v, gate and up, so more adapter "
                   f"parameters at the same rank; peer adapters {a.peer_lora_dtype}), "
                   f"{a.samples} synthetic conversations, {a.steps} steps, first {a.warmup} untimed. "
                   f"torch {env['torch']}, megatron-core {env['megatron-core']}, transformers {env['transformers']}, "
                   f"liger-kernel {env['liger-kernel']}.")
    command = invocation("bench.bench_lora", argv)
    print("\n" + summary_text("LoRA SFT: ShardForge LoRA vs full vs transformers + peft", env, description, command,
                              commands, lines), flush=True)
    if not (a.no_record or failed):
        path = write_result(a.out, "lora", command, rows, env, ratios=ratios, args=vars(a), subprocesses=commands)
        print(f"[bench] wrote {path}", flush=True)
    if failed:
        print("[bench] a transformers + peft peer failed: nothing recorded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
