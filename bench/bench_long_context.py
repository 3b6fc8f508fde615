"""Long context on one GPU: throughput at long sequences, and the longest sequence that trains.

    python -m bench.bench_long_context                    # llama_1b_32k: 32k, 64k, 128k; longest of 256k, 384k, 512k
    python -m bench.bench_long_context --lengths 131072 --probe ""     # one length, no search

The dense bench shape (`--model`, default llama_1b_32k) with max_position_embeddings raised to the
longest length asked for (a model yaml written beside the run, read by both sides), one sequence per
step (micro batch 1), each run in its own process:
  * ShardForge: `launcher.train model=<that yaml>` with `--sf-override`s (default: the long-context
    memory settings below);
  * HF + liger-kernel: `bench.hf_baseline --variant liger --gradient-checkpointing`, the peer with
    its own best memory settings (every decoder layer recomputed, liger's fused linear cross
    entropy so the logits never exist whole).
Throughput (`--lengths`): `--steps` steps per length, the first `--warmup` untimed; tokens/s, MFU
(launcher.flops' convention, full attention matmuls) and the causal-only MFU beside it, peak memory.
Longest (`--probe`): lengths tried in increasing order, one optimizer step each, per side, until the
first that fails; the row records why (out of memory or another error, the log's last line).

ShardForge's default settings here: the whole layer recomputed in the backward
(`train.recompute=full`: only each layer's input is kept, seq x hidden per layer), the loss in
chunks (always: models/kernels/linear_cross_entropy.py), no CUDA graph (its private memory pool
would hold a second copy of the step's peak), and the optimizer state in bf16 with stochastically
rounded bf16 weights (8 bytes a parameter, as the peer's bf16 AdamW holds). `--sf-variant` adds
throughput rows with other settings, e.g. `mlp:train.recompute=[mlp,layernorm]` (attention's
output kept rather than recomputed).

The default corpus (the stdlib docstrings) holds fewer tokens than one window of the longest
lengths; ShardForge then reads the same documents repeated until one window fits, written once as an
indexed dataset beside the run (`data=indexed`, the default corpus's tokenizer). The peer trains on
random tokens; the content does not change either side's speed or memory.
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.bench_train import _env, _fmt, causal_fraction, parse_variant, launch_command, summarize_metrics
from bench.gpu_power import PowerSampler
from bench.hf_baseline import load_model_yaml
from bench.results_io import REPO, environment, invocation, read_rows, write_result
from launcher.cli import compose_checked
from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter
from launcher.data.pretrain import prepare_default_corpus

SF_DEFAULTS = ["train.recompute=full", "train.cuda_graph=false", "optim.precision_aware=true",
               "optim.moments_dtype=bf16", "optim.main_grads_dtype=bf16", "optim.master_weights=stochastic"]
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")


def long_model_yaml(model: str, max_length: int, directory: Path) -> Path:
    """The model's yaml with max_position_embeddings raised to `max_length` (RoPE needs positions that far)."""
    shape = load_model_yaml(model)
    shape["max_position_embeddings"] = max(int(shape["max_position_embeddings"]), max_length)
    shape["name"] = f"{shape['name']}_{max_length // 1024}k"
    path = directory / f"{shape['name']}.yaml"
    path.write_text(yaml.safe_dump(shape, sort_keys=False))
    return path


def repeated_corpus(num_tokens: int, directory: Path) -> list[str]:
    """`data=` overrides for an indexed dataset of at least `num_tokens` tokens: the default corpus's
    documents (built or read from the cache, as launcher.train does) written over and over."""
    data = compose_checked(str(REPO / "conf"), "config", []).data
    tokenizer, prefix = prepare_default_corpus(Path(data.cache_dir), data.tokenizer_vocab_size, data.max_corpus_bytes)
    corpus = IndexedDataset(prefix)
    out = str(directory / "repeated")
    with IndexedDatasetWriter(out, corpus[0].dtype) as writer:
        written = 0
        while written < num_tokens:
            for i in range(len(corpus)):
                writer.add(corpus[i])
                written += len(corpus[i])
        writer.finalize()
    return ["data=indexed", f"data.prefixes=[{out}]", f"data.tokenizer={tokenizer}"]


def _run(label: str, cmd: list[str], log: Path) -> tuple[bool, str, str, dict[str, Any]]:
    """Run one side in its own process, its output to the console and `log`: (succeeded, command,
    why it failed: "out of memory" or the log's last line, the GPU's clock and power)."""
    text = shlex.join(cmd)
    print(f"\n[bench] {label}: {text}", flush=True)
    with PowerSampler() as power, log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
        rc = proc.wait()
    if rc == 0:
        return True, text, "", power.summary or {}
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    why = "out of memory" if any(m in line for line in lines for m in OOM_MARKERS) else (lines[-1] if lines else f"exit {rc}")
    print(f"[bench] {label} failed: {why}", file=sys.stderr, flush=True)
    return False, text, why, power.summary or {}


def run_shardforge(a: argparse.Namespace, model: Path, length: int, steps: int, warmup: int, work: Path,
                   name: str = "shardforge", extra: list[str] = ()) -> tuple[dict[str, Any], str]:
    run_dir = Path(tempfile.mkdtemp(prefix="sf_long_", dir=work))
    command = launch_command(run_dir, model=str(model), device=a.device, seq_length=length, micro_batch_size=1,
                             steps=steps, overrides=[*SF_DEFAULTS, *a.sf_override, *extra])
    ok, text, why, power = _run(f"{name} {length}", command, run_dir.with_suffix(".log"))
    row: dict[str, Any] = {"framework": name, "seq_length": length, "trained": ok, **power}
    if ok:
        row.update(summarize_metrics(run_dir / "metrics.jsonl", warmup), framework=name)
    else:
        row["failure"] = why
    return row, text


def run_hf(a: argparse.Namespace, model: Path, length: int, steps: int, warmup: int,
           work: Path) -> tuple[dict[str, Any], str]:
    out = Path(tempfile.mkdtemp(prefix="hf_long_", dir=work)) / "result.json"
    cmd = [sys.executable, "-m", "bench.hf_baseline", f"--model={model}", f"--seq-length={length}",
           "--micro-batch-size=1", f"--steps={steps}", f"--warmup={warmup}", f"--device={a.device}", f"--out={out}",
           "--variant=liger", "--gradient-checkpointing"]
    ok, text, why, power = _run(f"HF + liger {length}", cmd, out.with_suffix(".log"))
    row: dict[str, Any] = {"framework": "hf-liger-gc", "seq_length": length, "trained": ok, **power}
    if ok:
        row.update(read_rows(out)[0], framework="hf-liger-gc")
    else:
        row["failure"] = why
    return row, text


SIDES = {"shardforge": run_shardforge, "hf": run_hf}


def _report(row: dict[str, Any]) -> None:
    """One finished row as it comes (a run cut short still leaves its rows in the log)."""
    print(f"[bench] row: {json.dumps({k: v for k, v in row.items() if k != 'losses'})}", flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| framework | seq | tokens/s | MFU | MFU causal | peak mem (GiB) | step (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if not r["trained"]:
            lines.append(f"| {r['framework']} | {r['seq_length']:,} | failed: {r['failure']} | | | | |")
            continue
        lines.append(f"| {r['framework']} | {r['seq_length']:,} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('mfu_causal'), '.1%')} | "
                     f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(r.get('step_time_s'), '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b_32k", help="conf/model/<name> or a yaml path")
    p.add_argument("--lengths", default="32768,65536,131072", help="throughput rows: comma-separated sequence lengths")
    p.add_argument("--probe", default="262144,393216,524288",
                   help="longest-sequence search: lengths tried in increasing order, one step each ('' for none)")
    p.add_argument("--sides", default="shardforge,hf", help="shardforge and/or hf")
    p.add_argument("--steps", type=int, default=4, help="steps per throughput row, warmup included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sf-override", action="append", default=[], metavar="KEY=VALUE",
                   help=f"extra Hydra override for ShardForge, after {' '.join(SF_DEFAULTS)} (repeatable)")
    p.add_argument("--sf-variant", action="append", default=[], type=parse_variant, metavar="NAME:KEY=VALUE,...",
                   help="another ShardForge throughput row with these overrides on top (repeatable)")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_long_context.json; never overwritten)")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",") if x]
    probes = sorted(int(x) for x in a.probe.split(",") if x)
    sides = [s for s in a.sides.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="bench_long_"))
    model = long_model_yaml(a.model, max([*lengths, *probes]), work)
    if "shardforge" in sides:  # one window of the longest length, plus its shifted target
        a.sf_override = [*repeated_corpus(max([*lengths, *probes]) + 1, work), *a.sf_override]

    rows, commands = [], []
    runs = [functools.partial(SIDES[side]) for side in sides]
    if "shardforge" in sides:
        runs[sides.index("shardforge") + 1:sides.index("shardforge") + 1] = [
            functools.partial(run_shardforge, name=name, extra=extra) for name, extra in a.sf_variant]
    for length in lengths:
        for run in runs:
            row, cmd = run(a, model, length, a.steps, a.warmup, work)
            rows.append({**row, "kind": "throughput"})
            commands.append(cmd)
            _report(row)
    longest: dict[str, int] = {}
    for side in sides:
        for length in probes:
            row, cmd = SIDES[side](a, model, length, 1, 0, work)
            rows.append({**row, "kind": "probe"})
            commands.append(cmd)
            _report(row)
            if not row["trained"]:
                break
            longest[row["framework"]] = length
    for r in rows:
        if r["trained"]:
            r["mfu_causal"] = None if r.get("mfu") is None else r["mfu"] * causal_fraction(str(model), r["seq_length"])
            if len(r.get("losses") or []) > 50:
                del r["losses"]

    env = environment()
    command = invocation("bench.bench_long_context", argv)
    print(f"\n## {env['device']} — long context, model {a.model} (max_position_embeddings raised), micro batch 1\n")
    print(table([r for r in rows if r["kind"] == "throughput"]))
    print("\nLongest probe:\n")
    print(table([r for r in rows if r["kind"] == "probe"]))
    print("\nLongest trained: " + (", ".join(f"{k} {v:,}" for k, v in longest.items()) or "none of the probes"))
    print("\nSubprocesses:\n\n```\n" + "\n".join(commands) + "\n```", flush=True)
    if not a.no_record:
        path = write_result(a.out, "long_context", command, rows, env, args=vars(a), subprocesses=commands,
                            longest=longest, sf_defaults=SF_DEFAULTS)
        print(f"[bench] wrote {path}", flush=True)
    return 0 if all(r["trained"] for r in rows if r["kind"] == "throughput") else 1


if __name__ == "__main__":
    sys.exit(main())
