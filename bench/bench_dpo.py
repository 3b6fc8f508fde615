"""Benchmark: DPO on one GPU, ShardForge packed vs padded and vs TRL's DPOTrainer, on the same pairs.

    python -m bench.bench_dpo                          # llama3_1b, rows of 2048 packed / 1024 padded
    python -m bench.bench_dpo --device cpu --model tiny --seq-length 256 --samples 200 --steps 3 \
        --warmup 1 --peers eager --no-record           # smoke test

Builds a synthetic preference set with a long-tailed length distribution (lognormal prompt and
response lengths, chosen and rejected drawn independently: most pairs a few hundred tokens a side,
a few near the limit), tokenizes it with `launcher.preprocess format=preference` (the default
corpus's sentencepiece model; pairs with a side longer than seq_length / 2 skipped), and trains
`train.objective=dpo` (precomputed reference, before the first step) three ways:
  * ShardForge padded: one sequence per row, rows of seq_length / 2 (the longest side fits), micro
    batch 2 × micro_batch_size rows;
  * ShardForge packed (`data.packing=true`): whole pairs packed into rows of seq_length, micro batch
    micro_batch_size rows; both ShardForge runs hold the same row tokens per step;
  * TRL's DPOTrainer (bench/trl_dpo.py; `--peers`, default liger) on the same pairs as strings with
    the same tokenizer (its HF form, as launcher.convert writes it), `--trl-batch-pairs` pairs a step
    padded to the step's longest sequence.
The figure that matters is trained tokens per second: the pairs' real tokens (prompt and response
of both sides), padding excluded. Peak memory is torch.cuda.max_memory_allocated. The rows go into
one JSON result (bench/results_io.py; `--out`, default under bench/results/).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_packed import lognormal_text
from bench.bench_train import _env, _run, launch_command, summary_text
from bench.results_io import REPO, environment, invocation, read_rows, write_result


def write_pairs_jsonl(path: Path, samples: int, seed: int, max_words: int) -> None:
    rng = random.Random(seed)

    def text(median: float, sigma: float) -> str:
        return lognormal_text(rng, median, sigma, max_words)

    with path.open("w") as f:
        for _ in range(samples):
            f.write(json.dumps({"prompt": text(60, 1.0) + "\n", "chosen": text(150, 0.8),
                                "rejected": text(150, 0.8)}) + "\n")


def summarize(run_dir: Path, warmup: int) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("type", "train") == "train"]
    timed = [r for r in records if r["step"] > warmup]
    seconds = sum(r["step_time_s"] for r in timed)
    row_tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    real = sum(r["tokens_per_s"] * r["step_time_s"] * (1 - r["padding_fraction"]) for r in timed)
    return {"trained_tokens_per_s": real / seconds, "row_tokens_per_s": row_tokens / seconds,
            "pairs_per_s": sum(r["loss_tokens"] for r in timed) / seconds, "step_time_s": seconds / len(timed),
            "padding_fraction": 1 - real / row_tokens,
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0) for r in records) or None,
            "timed_steps": len(timed), "losses": [r["loss"] for r in records]}


def dpo_command(a: argparse.Namespace, prefix: Path, tokenizer: str, run_dir: Path, packing: bool,
                seq_length: int, micro_batch_size: int) -> list[str]:
    """`launcher.train` DPO on the pairs preprocessed at `prefix`, on one GPU (global batch = micro batch);
    the row shape is the caller's, as packed and padded rows differ."""
    return launch_command(run_dir, model=a.model, device=a.device, seq_length=seq_length,
                          micro_batch_size=micro_batch_size, steps=a.steps,
                          overrides=["data=indexed", f"data.prefixes=[{prefix}]", f"data.tokenizer={tokenizer}",
                                     f"data.packing={str(packing).lower()}", "train.objective=dpo", "dpo.beta=0.1"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_1b")
    p.add_argument("--seq-length", type=int, default=2048, help="packed row length; padded rows are half of it")
    p.add_argument("--micro-batch-size", type=int, default=2, help="packed rows per step (padded: twice as many)")
    p.add_argument("--trl-batch-pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--peers", default="liger", help="TRL variants (bench/trl_dpo.py --variant): liger, eager; "
                                                    "empty for none")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_dpo.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)

    import subprocess

    from omegaconf import OmegaConf

    from launcher.convert import _write_tokenizer
    from launcher.data.pretrain import prepare_default_corpus
    from launcher.data.tokenizer import load_tokenizer

    data_cfg = OmegaConf.load(REPO / "conf" / "data" / "stdlib_docs.yaml")
    tokenizer, _ = prepare_default_corpus(Path(data_cfg.cache_dir), data_cfg.tokenizer_vocab_size,
                                          data_cfg.max_corpus_bytes)
    work = Path(tempfile.mkdtemp(prefix="shardforge_dpo_"))
    pairs = work / "pairs.jsonl"
    side = a.seq_length // 2
    write_pairs_jsonl(pairs, a.samples, seed=0, max_words=side // 2)
    prefix = work / "pairs"
    subprocess.run([sys.executable, "-m", "launcher.preprocess", f"input={pairs}", f"output_prefix={prefix}",
                    f"tokenizer={tokenizer}", "format=preference", f"seq_length={side}", "skip_too_long=true",
                    "workers=4"], cwd=REPO, env=_env(), check=True)
    hf_tokenizer = work / "hf_tokenizer"
    hf_tokenizer.mkdir()
    _write_tokenizer(Path(tokenizer), load_tokenizer(str(tokenizer)), hf_tokenizer)

    rows, commands = [], []
    for packing in (False, True):
        run_dir = work / f"run_packing_{packing}"
        seq, mbs = (a.seq_length, a.micro_batch_size) if packing else (side, 2 * a.micro_batch_size)
        name = "ShardForge " + ("packed" if packing else "padded")
        ok, text, _ = _run(name, dpo_command(a, prefix, tokenizer, run_dir, packing, seq, mbs))
        commands.append(text)
        # a failed row is recorded and the other rows still run
        rows.append({"framework": name, "seq_length": seq, "micro_batch_size": mbs,
                     **(summarize(run_dir, a.warmup) if ok else {"failed": True})})

    failed = any(r.get("failed") for r in rows)
    for variant in [v for v in a.peers.split(",") if v]:
        out = work / f"trl_{variant}.json"
        cmd = [sys.executable, "-m", "bench.trl_dpo", f"--model={a.model}", f"--pairs={pairs}",
               f"--tokenizer={hf_tokenizer}", f"--batch-pairs={a.trl_batch_pairs}", f"--max-length={side}",
               f"--steps={a.steps}", f"--warmup={a.warmup}", f"--variant={variant}", f"--device={a.device}",
               f"--out={out}"]
        ok, text, _ = _run(f"TRL DPOTrainer ({variant})", cmd)
        commands.append(text)
        if not ok:
            failed = True
            rows.append({"framework": f"TRL DPOTrainer ({variant})", "failed": True})
            continue
        rows.append(json.loads(out.read_text()))

    env = environment()
    lines = ["| DPO run | trained tokens/s | row tokens/s | padding | pairs/s | step (ms) | peak mem (GiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['framework']} | failed | | | | | |")
            continue
        mem = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        lines.append(f"| {r['framework']} | {r['trained_tokens_per_s']:,.0f} | {r['row_tokens_per_s']:,.0f} | "
                     f"{r['padding_fraction']:.1%} | {r['pairs_per_s']:.1f} | {r['step_time_s'] * 1e3:.1f} | {mem} |")
    padded, packed = rows[0], rows[1]
    for r in [padded, *rows[2:]]:
        if not (r.get("failed") or packed.get("failed")):
            lines.append(f"\nShardForge packed / {r['framework']}, trained tokens per second: "
                         f"{packed['trained_tokens_per_s'] / r['trained_tokens_per_s']:.2f}×")
    description = (f"model `{a.model}`, DPO (sigmoid, beta 0.1, precomputed reference), {a.samples} synthetic pairs "
                   f"(lognormal lengths, each side at most {side} tokens), ShardForge rows of {a.seq_length} "
                   f"packed ({a.micro_batch_size} a step) and {side} padded ({2 * a.micro_batch_size} a step), "
                   f"TRL {a.trl_batch_pairs} pairs a step; {a.steps} steps, first {a.warmup} untimed. "
                   f"torch {env['torch']}, megatron-core {env['megatron-core']}, transformers {env['transformers']}, "
                   f"liger-kernel {env['liger-kernel']}.")
    command = invocation("bench.bench_dpo", argv)
    print("\n" + summary_text("DPO: packed vs padded, TRL peer", env, description, command, commands, lines), flush=True)
    if not a.no_record:  # (failed rows included: what ran is data too)
        path = write_result(a.out, "dpo", command, rows, env, args=vars(a), subprocesses=commands)
        print(f"[bench] wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
