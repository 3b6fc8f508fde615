"""Benchmark: MoE training on one GPU, ShardForge vs transformers' own Qwen3-MoE, in one call.

    python -m bench.bench_moe                                   # qwen3_30b_a3b at 2 and 8 layers
    python -m bench.bench_moe --layers 2 --peers eager,compile,liger \\
        --sf-variant megatron:train.moe_dispatch=megatron       # + megatron's MoE dispatch, + liger
    python -m bench.bench_moe --device cpu --model qwen_moe_tiny --layers 2 --seq-length 64 \\
        --steps 3 --warmup 1 --peers eager --no-record         # CPU smoke test of this script

For each layer count (the model truncated to `--layers` layers: the 2-layer proxy is dominated by
the 152k-vocabulary output layer, the 8-layer one less so), every row trains the same shape in its
own process, one after the other:
  * ShardForge: `launcher.train model=... model.num_layers=L` (bench_train's command and reading of
    metrics.jsonl), then each `--sf-variant` (NAME:KEY=VALUE,... on top of `--sf-override`);
  * transformers: `Qwen3MoeForCausalLM` built from the same shape (bf16 parameters, SDPA, its default
    experts implementation, grouped GEMMs where torch has them; router aux loss on with the same
    coefficient), `torch.optim.AdamW(fused=True)`, on random tokens (bench/hf_baseline.py's loop,
    timed with CUDA events): eager, `torch.compile`d, or with liger-kernel's RoPE, RMSNorm and fused
    linear cross entropy (its SwiGLU replaces the grouped experts: left off).
MFU is launcher.flops' formula over the active parameters (top-k experts; the router not counted),
dense bf16 peak, for every row; `MFU causal` counts half of the attention matmuls. Peak memory is
torch.cuda.max_memory_allocated. ShardForge's rows carry the expert load it measured (real routing,
nothing forced).

`--block`: one MoE layer alone, forward + backward on micro batch x seq tokens from a random
input (a randomly initialized router: its real routing), timed with CUDA events: ShardForge's
FusedMoELayer, megatron's MoELayer (grouped GEMM experts) and transformers' Qwen3MoeSparseMoeBlock;
TF/s counts the experts' three matmuls per routed token and the router's, 6 FLOPs per parameter.

Each finished row is printed as one `ROW {json}` line at once (a run cut short keeps those); the
table and one JSON result (bench/results_io.py; `failed` true when a row failed) come at the end.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_train import _env, _fmt, parse_variant, run_shardforge  # noqa: E402
from bench.results_io import environment, invocation, write_result  # noqa: E402

VARIANTS = ("eager", "compile", "liger")


def model_args(model: str, layers: int):
    """ModelArgs of conf/model/<model>.yaml with `layers` layers."""
    from omegaconf import OmegaConf

    from models.args import ModelArgs

    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
    cfg.num_layers = layers
    return ModelArgs.from_config(cfg)


def flops(args, seq_length: int) -> tuple[float, float]:
    """(training FLOPs per token, the share left when attention counts causally)."""
    from launcher.flops import train_flops_per_token

    shape = args.flops_shape()
    full = train_flops_per_token(seq_length=seq_length, **shape)
    head_dim = shape["kv_channels"] or shape["hidden_size"] // shape["num_attention_heads"]
    attention = 12 * shape["num_layers"] * shape["num_attention_heads"] * head_dim * seq_length
    return full, (full - attention / 2) / full


def hf_config(args):
    """transformers' Qwen3MoeConfig of this shape (every layer sparse)."""
    import inspect

    from transformers import Qwen3MoeConfig

    head_dim = args.kv_channels or args.hidden_size // args.num_attention_heads
    theta = float(args.rotary_base)
    if "rope_parameters" in inspect.signature(Qwen3MoeConfig.__init__).parameters:  # transformers >= 5
        rope: dict[str, Any] = {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    else:
        rope = {"rope_theta": theta}
    return Qwen3MoeConfig(**rope,
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        moe_intermediate_size=args.moe_ffn_hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_query_groups, head_dim=head_dim,
        num_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=args.norm_epsilon,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=args.moe_aux_loss_coeff,
        use_cache=False, attn_implementation="sdpa")


def run_hf_peer(a: argparse.Namespace) -> dict[str, Any]:
    """One transformers row (this process): --hf-peer VARIANT at --layers L."""
    import torch

    from bench.hf_baseline import train_timed
    from launcher.flops import peak_flops

    (layers,) = a.layers
    args = model_args(a.model, layers)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(1234)
    if a.hf_peer == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe

        apply_liger_kernel_to_qwen3_moe(rope=True, rms_norm=True, swiglu=False, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
    from transformers import Qwen3MoeForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = Qwen3MoeForCausalLM(hf_config(args))
    finally:
        torch.set_default_dtype(default)
    model.train()
    experts = getattr(model.config, "_experts_implementation", None)
    if a.hf_peer == "compile":
        model = torch.compile(model)
    gen = torch.Generator(device=dev).manual_seed(1234)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, args.vocab_size, (a.micro_batch_size, a.seq_length), device=dev, generator=gen)
        batches.append({"input_ids": tokens, "labels": tokens})
    losses, times = train_timed(model, batches, a.steps, a.warmup, dev, lr=3e-4, clip_grad=None)
    tokens_per_s = a.micro_batch_size * a.seq_length * len(times) / sum(times)
    per_token, _ = flops(args, a.seq_length)
    peak = peak_flops(dev)
    return {"framework": f"hf-{a.hf_peer}", "tokens_per_s": tokens_per_s,
            "mfu": per_token * tokens_per_s / peak if peak else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "step_time_s": sum(times) / len(times), "timed_steps": len(times), "warmup_steps": a.warmup,
            "losses": losses, "experts_implementation": experts}


def _time_fwd_bwd(fn, x, grad, steps: int) -> float:
    """Median seconds of forward + backward of fn(x) over `steps` runs, after warmup (CUDA events on
    CUDA, the host clock elsewhere)."""
    import statistics
    import time

    import torch

    cuda = x.is_cuda
    for _ in range(3):
        fn(x).backward(grad)
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x).backward(grad)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(x).backward(grad)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_block(a: argparse.Namespace) -> list[dict[str, Any]]:
    """--block (this process): one MoE layer's forward + backward, three implementations (on CPU both
    ShardForge rows run megatron's path: a smoke test)."""
    import torch
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from models import kernel_provider as kp
    from models.fused_moe import FusedMoELayer
    from models.init import init_weights
    from models.llama import build_llama, transformer_config
    from parallel.layout import Layout
    from parallel.megatron_engine import init_distributed, shutdown

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = model_args(a.model, 1)
    tokens = a.micro_batch_size * a.seq_length
    expert = 3 * args.hidden_size * args.moe_ffn_hidden_size
    active = args.moe_router_topk * expert + args.hidden_size * args.num_experts
    block_flops = 6.0 * active * tokens
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(a.seq_length, a.micro_batch_size, args.hidden_size, device=dev, generator=g).to(dtype)
    grad = torch.randn(x.shape, device=dev, generator=g).to(dtype)
    rows = []

    def row(name: str, seconds: float) -> None:
        rows.append({"framework": name, "block_ms": seconds * 1e3, "block_tflops": block_flops / seconds / 1e12,
                     "tokens": tokens})
        print("ROW " + json.dumps({"block": rows[-1]}), flush=True)

    init_distributed(Layout(world_size=1), dev, seed=0)
    try:
        config = transformer_config(args, tp=1, pp=1, vpp=None, params_dtype=dtype, on_cpu=dev.type == "cpu",
                                    recompute=None)
        options = kp.KernelOptions(device="cuda", moe_dispatch="fused")
        model = build_llama(args, config, options, pre_process=True, post_process=True)
        init_weights(model, seed=0, std=args.init_method_std, num_layers=args.num_layers)
        model.train()
        layer = model.decoder.layers[0].mlp
        assert isinstance(layer, FusedMoELayer) and layer.fused_path(x) == (dev.type == "cuda")
        xs = x.clone().requires_grad_()
        row("shardforge FusedMoELayer", _time_fwd_bwd(lambda h: FusedMoELayer.forward(layer, h)[0], xs, grad, a.steps))
        row("megatron MoELayer (grouped GEMM experts)",
            _time_fwd_bwd(lambda h: MoELayer.forward(layer, h)[0], xs, grad, a.steps))
        del model, layer
    finally:
        shutdown()
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            config = hf_config(args)
            config._experts_implementation = "grouped_mm"
            block = Qwen3MoeSparseMoeBlock(config)
            torch.nn.init.normal_(block.gate.weight, std=args.init_method_std)
            for p in block.experts.parameters():
                torch.nn.init.normal_(p, std=args.init_method_std)
    finally:
        torch.set_default_dtype(default)

    def hf(h):
        out = block(h)
        return out[0] if isinstance(out, tuple) else out

    x_hf = x.transpose(0, 1).contiguous().requires_grad_()  # [batch, seq, hidden]
    row("hf Qwen3MoeSparseMoeBlock", _time_fwd_bwd(hf, x_hf, grad.transpose(0, 1).contiguous(), a.steps))
    return rows


def _subprocess_row(a: argparse.Namespace, argv: list[str], label: str) -> tuple[list[dict[str, Any]], str]:
    out = Path(tempfile.mkdtemp(prefix="bench_moe_")) / "rows.json"
    cmd = [sys.executable, "-m", "bench.bench_moe", *argv, f"--model={a.model}", f"--seq-length={a.seq_length}",
           f"--micro-batch-size={a.micro_batch_size}", f"--steps={a.steps}", f"--warmup={a.warmup}",
           f"--device={a.device}", f"--rows-out={out}"]
    text = shlex.join(cmd)
    print(f"\n[bench] {label}: {text}", flush=True)
    rc = subprocess.run(cmd, cwd=REPO, env=_env()).returncode
    if rc != 0 or not out.exists():
        print(f"[bench] {label} failed (exit {rc})", file=sys.stderr, flush=True)
        return [], text
    return json.loads(out.read_text()), text


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| layers | run | tokens/s | MFU | MFU causal | peak mem (GiB) | step (ms) | loss first → last "
             "| vs best HF |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        if "block_ms" in r:
            continue
        best = max((p["tokens_per_s"] for p in rows if p.get("layers") == r["layers"]
                    and p["framework"].startswith("hf-")), default=None)
        losses = r.get("losses") or []
        loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "n/a"
        step_ms = None if r.get("step_time_s") is None else r["step_time_s"] * 1e3
        ratio = f"{r['tokens_per_s'] / best:.2f}×" if best else "n/a"
        lines.append(f"| {r['layers']} | {r['framework']} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r['mfu'], '.1%')} | {_fmt(r.get('mfu_causal'), '.1%')} | "
                     f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(step_ms, '.1f')} | {loss} | {ratio} |")
    for r in rows:
        if r.get("moe"):
            lines.append(f"\n{r['framework']} ({r['layers']} layers) MoE, mean over timed steps: " +
                         ", ".join(f"{k} {v:.4g}" for k, v in r["moe"].items()))
    block = [r for r in rows if "block_ms" in r]
    if block:
        lines += ["", "| MoE layer alone, fwd + bwd | ms | TF/s |", "| --- | ---: | ---: |"]
        lines += [f"| {r['framework']} | {r['block_ms']:.2f} | {r['block_tflops']:.0f} |" for r in block]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_30b_a3b", help="conf/model/<name> (an MoE model)")
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8],
                   help="comma-separated layer counts, one proxy each")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="steps per row, warmup included")
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of the averages")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    p.add_argument("--peers", default="eager,compile",
                   help="comma-separated transformers variants: eager, compile, liger")
    p.add_argument("--peer-layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="layer counts that run the transformers peers (default: every one)")
    p.add_argument("--sf-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every ShardForge row (repeatable)")
    p.add_argument("--sf-variant", action="append", default=[], type=parse_variant, metavar="NAME:KEY=VALUE,...",
                   help="another ShardForge row with these overrides on top of --sf-override (repeatable)")
    p.add_argument("--block", action="store_true", help="also time one MoE layer alone (CUDA)")
    p.add_argument("--label", default="", help="what this run compares, kept in the result")
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_moe.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    p.add_argument("--hf-peer", choices=VARIANTS, help=argparse.SUPPRESS)  # one transformers row, this process
    p.add_argument("--block-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.hf_peer or a.block_only:  # a child process: its rows to --rows-out
        rows = [run_hf_peer(a)] if a.hf_peer else run_block(a)
        Path(a.rows_out).write_text(json.dumps(rows))
        return 0

    rows: list[dict[str, Any]] = []
    commands: list[str] = []
    failed = False

    def add(new: list[dict[str, Any]], layers: int | None) -> None:
        for r in new:
            if layers is not None:
                args = model_args(a.model, layers)
                _, causal = flops(args, a.seq_length)
                r["layers"] = layers
                r["mfu_causal"] = None if r.get("mfu") is None else r["mfu"] * causal
            rows.append(r)
            print("ROW " + json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)

    for layers in a.layers:
        sf = argparse.Namespace(model=a.model, device=a.device, seq_length=a.seq_length,
                                micro_batch_size=a.micro_batch_size, global_batch_size=a.micro_batch_size, nproc=1,
                                steps=a.steps, warmup=a.warmup,
                                sf_override=[*a.sf_override, f"model.num_layers={layers}"])
        for name, extra in [("shardforge", []), *a.sf_variant]:
            result, text = run_shardforge(sf, name=name, extra=extra)
            commands.append(text)
            failed |= result is None
            add([result] if result else [], layers)
        if a.peer_layers is None or layers in a.peer_layers:
            for variant in [v for v in a.peers.split(",") if v]:
                new, text = _subprocess_row(a, [f"--hf-peer={variant}", f"--layers={layers}"],
                                            f"transformers ({variant}, {layers} layers)")
                commands.append(text)
                failed |= not new
                add(new, layers)
    if a.block:
        new, text = _subprocess_row(a, ["--block-only"], "one MoE layer")
        commands.append(text)
        failed |= not new
        add(new, None)

    env = environment()
    command = invocation("bench.bench_moe", argv)
    print(f"\n## {env['device']}" + (f" — {a.label}" if a.label else "") + "\n\nCommand:\n\n```\n" + command +
          "\n```\n\nSubprocesses:\n\n```\n" + "\n".join(commands) + "\n```\n\n" + table(rows) + "\n", flush=True)
    if not a.no_record:  # (a failed row is missing from the table, its command is kept)
        path = write_result(a.out, "moe", command, rows, env, label=a.label, args=vars(a), subprocesses=commands,
                            failed=failed)
        print(f"[bench] wrote {path}", flush=True)
    if failed:
        print("[bench] a row failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
