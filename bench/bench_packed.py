"""Benchmark: packed vs padded SFT through ShardForge on one GPU, and the HF padding-free peer.

    python -m bench.bench_packed                       # llama3_1b, seq 4096, micro batch 2, peer hf liger
    python -m bench.bench_packed --samples 300 --device cpu --model tiny --seq-length 256 --steps 4 \
        --warmup 1 --peers eager --no-record           # smoke test

Builds a synthetic chat set with a long-tailed length distribution (lognormal user and assistant
turns, like instruction-tuning data: most conversations a few hundred tokens, a few thousand at
the tail), tokenizes it with `launcher.preprocess` (the default corpus's sentencepiece model), and
trains it twice with `launcher.train data=indexed data.format=sft`: `data.packing=false` (one
conversation per row, padded to seq_length) and `data.packing=true` (conversations packed into
rows, attention split per document: varlen attention on GPU). Both runs use the same micro and
global batch in rows, so the figure that matters is trained (loss) tokens per second.

The peer (`--peers`, default liger; eager/compile also run, eager on CPU too) is HF transformers
trained on the same preprocessed conversations: `python -m bench.hf_baseline --sft-data PREFIX`
(see there) takes conversations in order up to micro_batch_size x seq_length positions a step, the
same budget per step as ShardForge's rows, in both of transformers' usual layouts (`--peer-layouts`):
flattened with `transformers.DataCollatorWithFlattening` (labels -100 where ShardForge's loss mask is
0; SDPA attention: no flash-attn on the GPU machine, so transformers builds a block-causal mask from
the position_ids; the run checks that no conversation sees another), and a row per conversation
right-padded to the step's longest (SDPA's causal kernels, the padding computed); for liger with
liger-kernel's Llama kernels. Each run is its own subprocess. The table is printed and the rows
are written as one JSON result (bench/results_io.py; `--out`, default under bench/results/).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from bench.bench_train import _env, _run, launch_command, summary_text
from bench.results_io import REPO, environment, invocation, read_rows, write_result

WORDS = ("the function returns a value for each key in the mapping and raises an error when the "
         "argument is not a valid path to a file or directory object with attributes like name size "
         "mode and time of the last change which the caller may read or write through this module").split()


def lognormal_text(rng: random.Random, median: float, sigma: float, max_words: int) -> str:
    """Words of WORDS, as many as a lognormal draw around `median` (1 to max_words): long-tailed lengths."""
    n = max(1, min(max_words, int(rng.lognormvariate(0.0, sigma) * median)))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_chat_jsonl(path: Path, samples: int, seed: int, max_words: int) -> None:
    rng = random.Random(seed)

    def text(median: float, sigma: float) -> str:
        return lognormal_text(rng, median, sigma, max_words)

    with path.open("w") as f:
        for _ in range(samples):
            messages = [{"role": "user", "content": text(60, 1.0)}, {"role": "assistant", "content": text(180, 1.0)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def prepare_chat(work: Path, samples: int, seq_length: int) -> tuple[str, Path]:
    """The synthetic chat set tokenized by `launcher.preprocess format=sft` into `work`:
    (the default corpus's tokenizer, the indexed dataset's prefix)."""
    from launcher.data.pretrain import prepare_default_corpus
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.load(REPO / "conf" / "data" / "stdlib_docs.yaml")
    # The default corpus's tokenizer, where `launcher.train` keeps it (SHARDFORGE_CACHE or ~/.cache).
    tokenizer, _ = prepare_default_corpus(Path(data_cfg.cache_dir), data_cfg.tokenizer_vocab_size,
                                          data_cfg.max_corpus_bytes)
    chat = work / "chat.jsonl"
    write_chat_jsonl(chat, samples, seed=0, max_words=seq_length // 3)
    prefix = work / "chat"
    subprocess.run([sys.executable, "-m", "launcher.preprocess", f"input={chat}", f"output_prefix={prefix}",
                    f"tokenizer={tokenizer}", "format=sft", "workers=4"], cwd=REPO, env=_env(), check=True)
    return tokenizer, prefix


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(run_dir: Path, warmup: int) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("type", "train") == "train"]  # not eval records
    timed = [r for r in records if r["step"] > warmup]
    total_time = sum(r["step_time_s"] for r in timed)
    return {"loss_tokens_per_s": sum(r["loss_tokens"] for r in timed) / total_time,
            "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / total_time,
            "mfu": sum(r["mfu"] * r["step_time_s"] for r in timed) / total_time if all("mfu" in r for r in timed)
            else None,
            # per-step values (each step's global batch): their mean over the timed steps
            "padding_fraction": _mean(r.get("padding_fraction") for r in timed),
            "samples_per_row": _mean(r.get("samples_per_row") for r in timed),
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0) for r in records) or None,
            "step_time_s": total_time / len(timed), "timed_steps": len(timed),
            "losses": [r["loss"] for r in records]}


def add_peer_layouts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer-layouts", default="packed,padded",
                   help="the HF peers' batches: packed (DataCollatorWithFlattening) and/or padded (a row per "
                        "conversation, SDPA's causal kernels)")


def run_sft_peers(a: argparse.Namespace, prefix: Path, work: Path, label: Callable[[str, str], str],
                  extra: list[str] = ()) -> tuple[list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]], list[str]]:
    """Each `--peers` variant in each `--peer-layouts` layout, `bench.hf_baseline --sft-data PREFIX` (+ `extra`)
    in its own process: ([(variant, layout, its result row or None if it failed, the run's GPU power)], commands)."""
    results, commands = [], []
    for variant in [v for v in a.peers.split(",") if v]:
        for layout in [x for x in a.peer_layouts.split(",") if x]:
            out = work / f"hf_{variant}_{layout}.json"
            cmd = [sys.executable, "-m", "bench.hf_baseline", f"--model={a.model}", f"--sft-data={prefix}",
                   f"--sft-layout={layout}", f"--seq-length={a.seq_length}", f"--micro-batch-size={a.micro_batch_size}",
                   f"--steps={a.steps}", f"--warmup={a.warmup}", f"--device={a.device}", f"--variant={variant}",
                   *extra, f"--out={out}"]
            ok, text, power = _run(label(variant, layout), cmd)
            commands.append(text)
            results.append((variant, layout, read_rows(out)[0] if ok else None, power))
    return results, commands


def sft_command(a: argparse.Namespace, prefix: Path, tokenizer: str, run_dir: Path, packing: bool,
                overrides: list[str] = ()) -> list[str]:
    """`launcher.train` on the chat set preprocessed at `prefix`, on one GPU (global batch = micro batch);
    `overrides` come after the data settings, so they win."""
    data = ["data=indexed", f"data.prefixes=[{prefix}]", f"data.tokenizer={tokenizer}", "data.format=sft",
            f"data.packing={str(packing).lower()}"]
    return launch_command(run_dir, model=a.model, device=a.device, seq_length=a.seq_length,
                          micro_batch_size=a.micro_batch_size, steps=a.steps, overrides=[*data, *overrides])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_1b")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--peers", default="liger",
                   help="comma-separated HF packed peers (bench.hf_baseline --sft-data --variant=...): liger, "
                        "eager, compile; empty for none. liger needs CUDA; eager smoke-tests on CPU")
    add_peer_layouts(p)
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_packed.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="shardforge_packed_"))
    tokenizer, prefix = prepare_chat(work, a.samples, a.seq_length)

    rows, commands = [], []
    for packing in (False, True):
        run_dir = work / f"run_packing_{packing}"
        ok, text, _ = _run("packed" if packing else "padded", sft_command(a, prefix, tokenizer, run_dir, packing))
        commands.append(text)
        if not ok:
            return 1
        r = summarize(run_dir, a.warmup)
        rows.append({"mode": "ShardForge " + ("packed" if packing else "padded"), **r,
                     "unfilled": r["padding_fraction"],
                     "samples_per_step": r["samples_per_row"] * a.micro_batch_size})

    peers, peer_commands = run_sft_peers(a, prefix, work, lambda variant, layout: f"HF {layout} peer ({variant})")
    commands += peer_commands
    failed = any(r is None for _, _, r, _ in peers)
    for variant, layout, r, _ in peers:
        if r is None:
            continue
        mode = "DataCollatorWithFlattening" if layout == "packed" else "a padded row per conversation"
        # unfilled: the share of the step's position budget left over, plus (padded) the padding computed
        rows.append({**r, "mode": f"HF {variant} + {mode}",
                     "unfilled": 1 - r["budget_fill"] * (1 - r.get("padding_fraction", 0.0)),
                     "samples_per_step": r["samples_per_step"]})

    env = environment()
    lines = ["| SFT run | loss tokens/s | tokens/s | padding / unfilled | conversations/step | step (ms) | MFU | "
             "peak mem (GiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mem = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['mode']} | {r['loss_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['unfilled']:.1%} | {r['samples_per_step']:.1f} | {r['step_time_s'] * 1e3:.1f} | {mfu} | {mem} |")
    padded, packed = rows[0], rows[1]
    lines.append(f"\nShardForge packed / padded, trained tokens per second: "
                 f"{packed['loss_tokens_per_s'] / padded['loss_tokens_per_s']:.2f}×")
    for r in rows[2:]:
        lines.append(f"\nShardForge packed / HF peer ({r['framework']}), trained tokens per second: "
                     f"{packed['loss_tokens_per_s'] / r['loss_tokens_per_s']:.2f}×")
    lines.append("\ntokens/s counts every position computed: ShardForge's rows of seq_length with their padding, "
                 "the HF peers' batches (each step holds conversations in order up to micro batch × seq length "
                 "positions: flattened without padding, or a row per conversation padded to the step's longest; "
                 "`unfilled` is the share of that budget holding no conversation token). "
                 "MFU: launcher.flops at seq_length for both.")
    peers = rows[2:]
    if peers:
        checks = "; ".join(f"{r['framework']}: changing conversation 0 moved its hidden states by "
                           f"{r['isolation_own_change']:.3g}, the other {r['isolation_samples'] - 1} by "
                           f"{r['isolation_leak']:.3g}" for r in peers if "isolation_leak" in r)
        if checks:
            lines.append(f"\nHF peer attention isolation check (first packed batch): {checks}.")
    description = (f"model `{a.model}`, seq {a.seq_length}, micro batch {a.micro_batch_size} rows "
                   f"(global batch = micro batch; the HF peers: at most {a.micro_batch_size * a.seq_length} "
                   f"positions per step, flattened or padded per conversation), {a.samples} synthetic conversations "
                   f"(lognormal turn lengths), {a.steps} steps, first {a.warmup} untimed. "
                   f"torch {env['torch']}, megatron-core {env['megatron-core']}, transformers {env['transformers']}, "
                   f"liger-kernel {env['liger-kernel']}.")
    command = invocation("bench.bench_packed", argv)
    print("\n" + summary_text("packed vs padded SFT" + (", HF peers" if a.peers else ""), env,
                              description, command, commands, lines), flush=True)
    if not (a.no_record or failed):
        path = write_result(a.out, "packed", command, rows, env, args=vars(a), subprocesses=commands)
        print(f"[bench] wrote {path}", flush=True)
    if failed:
        print("[bench] an HF peer failed: nothing recorded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
