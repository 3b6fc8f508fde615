"""Benchmark: packed vs padded SFT through ShardForge on one GPU (same data, model, rows per step).

    python -m bench.bench_packed                       # llama3_1b, seq 4096, micro batch 2
    python -m bench.bench_packed --samples 3000 --device cpu --model tiny --seq-length 256   # smoke test

Builds a synthetic chat set with a long-tailed length distribution (lognormal user and assistant
turns, like instruction-tuning data: most conversations a few hundred tokens, a few thousand at
the tail), tokenizes it with `launcher.preprocess` (the default corpus's sentencepiece model), and
trains it twice with `launcher.train data=indexed data.format=sft`: `data.packing=false` (one
conversation per row, padded to seq_length) and `data.packing=true` (conversations packed into
rows, attention split per document: varlen attention on GPU). Both runs use the same micro and
global batch in rows, so the figure that matters is trained (loss) tokens per second.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_train import REPO, _env, _run, environment, report, results_block

WORDS = ("the function returns a value for each key in the mapping and raises an error when the "
         "argument is not a valid path to a file or directory object with attributes like name size "
         "mode and time of the last change which the caller may read or write through this module").split()


def write_chat_jsonl(path: Path, samples: int, seed: int, max_words: int) -> None:
    rng = random.Random(seed)

    def text(median: float, sigma: float) -> str:
        n = max(1, min(max_words, int(rng.lognormvariate(0.0, sigma) * median)))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with path.open("w") as f:
        for _ in range(samples):
            messages = [{"role": "user", "content": text(60, 1.0)}, {"role": "assistant", "content": text(180, 1.0)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def summarize(run_dir: Path, warmup: int) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] > warmup]
    total_time = sum(r["step_time_s"] for r in timed)
    return {"loss_tokens_per_s": sum(r["loss_tokens"] for r in timed) / total_time,
            "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / total_time,
            "padding_fraction": records[-1].get("padding_fraction"),
            "samples_per_row": records[-1].get("samples_per_row"),
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0) for r in records) or None,
            "step_time_s": total_time / len(timed), "timed_steps": len(timed),
            "losses": [r["loss"] for r in records]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_1b")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)

    from launcher.data.pretrain import prepare_default_corpus
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.load(REPO / "conf" / "data" / "stdlib_docs.yaml")
    # The default corpus's tokenizer, where `launcher.train` keeps it (SHARDFORGE_CACHE or ~/.cache).
    tokenizer, _ = prepare_default_corpus(Path(data_cfg.cache_dir), data_cfg.tokenizer_vocab_size,
                                          data_cfg.max_corpus_bytes)
    work = Path(tempfile.mkdtemp(prefix="shardforge_packed_"))
    chat = work / "chat.jsonl"
    write_chat_jsonl(chat, a.samples, seed=0, max_words=a.seq_length // 3)
    prefix = work / "chat"
    subprocess.run([sys.executable, "-m", "launcher.preprocess", f"input={chat}", f"output_prefix={prefix}",
                    f"tokenizer={tokenizer}", "format=sft", "workers=4"], cwd=REPO, env=_env(), check=True)

    rows, commands = [], []
    for packing in (False, True):
        run_dir = work / f"run_packing_{packing}"
        cmd = [sys.executable, "-m", "launcher.train", f"model={a.model}", f"device={a.device}", "data=indexed",
               f"data.prefixes=[{prefix}]", f"data.tokenizer={tokenizer}", "data.format=sft",
               f"data.packing={str(packing).lower()}", f"train.seq_length={a.seq_length}",
               f"train.micro_batch_size={a.micro_batch_size}", f"train.global_batch_size={a.micro_batch_size}",
               f"train.steps={a.steps}", "logging.wandb.mode=disabled", "logging.progress=false",
               "checkpoint.save_every=0", "checkpoint.final_save=false", f"run.dir={run_dir}"]
        ok, text = _run("packed" if packing else "padded", cmd)
        commands.append(text)
        if not ok:
            return 1
        rows.append({"mode": "packed" if packing else "padded", **summarize(run_dir, a.warmup)})

    env = environment()
    lines = ["| ShardForge SFT | loss tokens/s | row tokens/s | padding | samples/row | step (ms) | peak mem (GiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mem = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        lines.append(f"| {r['mode']} | {r['loss_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['padding_fraction']:.1%} | {r['samples_per_row']:.2f} | {r['step_time_s'] * 1e3:.1f} | {mem} |")
    lines.append(f"\nPacked / padded, trained tokens per second: "
                 f"{rows[1]['loss_tokens_per_s'] / rows[0]['loss_tokens_per_s']:.2f}×")
    description = (f"model `{a.model}`, seq {a.seq_length}, micro batch {a.micro_batch_size} rows "
                   f"(global batch = micro batch), {a.samples} synthetic conversations (lognormal turn lengths), "
                   f"{a.steps} steps, first {a.warmup} untimed. "
                   f"torch {env['torch']}, megatron-core {env['megatron-core']}.")
    text = results_block("packed vs padded SFT", env, description, "bench.bench_packed", argv, commands, lines)
    report(text, record=not a.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
