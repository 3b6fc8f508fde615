"""HF transformers baseline for bench/bench_train.py: the same model shape, trained the plain way.

`LlamaForCausalLM` built from a `LlamaConfig` (random init, `attn_implementation="sdpa"`, bf16
parameters), `torch.optim.AdamW(fused=True)`, random token batches of the benchmark's shape.
Throughput is timed with CUDA events over the steps after warmup; MFU uses the project's one
formula (launcher.flops), so it compares directly with ShardForge's metrics.jsonl.

    python -m bench.hf_baseline --model llama3_1b --seq-length 4096 --micro-batch-size 2 --json
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/hf_baseline.py` as well as `python -m bench.hf_baseline`
    sys.path.insert(0, str(REPO))

from launcher.flops import peak_flops, train_flops_per_token  # noqa: E402

# Llama-3 long-context RoPE (the published Llama-3.1/3.2 values; only the factor is in our yaml).
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def load_model_yaml(name_or_path: str) -> dict[str, Any]:
    """conf/model/<name>.yaml (or a path to such a file) as a plain dict."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = REPO / "conf" / "model" / f"{name_or_path}.yaml"
    return yaml.safe_load(path.read_text())


def flops_shape(m: dict[str, Any]) -> dict[str, Any]:
    """The model shape as launcher.flops keyword arguments."""
    return dict(num_layers=m["num_layers"], hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
                num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_query_groups"],
                vocab_size=m["vocab_size"], kv_channels=m.get("kv_channels"))


def llama_config(m: dict[str, Any]):
    """A transformers LlamaConfig with ShardForge's model shape (conf/model/*.yaml keys)."""
    from transformers import LlamaConfig

    head_dim = m.get("kv_channels") or m["hidden_size"] // m["num_attention_heads"]
    theta = float(m.get("rotary_base", 10000))
    rope = dict(LLAMA3_ROPE, factor=float(m.get("rope_scaling_factor", 8.0))) if m.get("rope_scaling") else None
    kwargs: dict[str, Any] = dict(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_query_groups"], head_dim=head_dim,
        max_position_embeddings=m["max_position_embeddings"], rms_norm_eps=float(m.get("norm_epsilon", 1e-5)),
        initializer_range=float(m.get("init_method_std", 0.02)), tie_word_embeddings=bool(m["tie_word_embeddings"]),
        attention_bias=bool(m.get("add_qkv_bias", False)), use_cache=False, attn_implementation="sdpa",
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        kwargs["rope_parameters"] = dict(rope or {"rope_type": "default"}, rope_theta=theta)
    else:
        kwargs.update(rope_theta=theta, rope_scaling=rope)
    return LlamaConfig(**kwargs)


VARIANTS = ("eager", "compile", "liger")


def build_model(m: dict[str, Any], device: torch.device, dtype: torch.dtype, variant: str = "eager"):
    """The HF model as a user would run it: eager (SDPA), `torch.compile`d, or with liger-kernel's
    Triton kernels (RoPE, RMSNorm, SwiGLU, fused linear cross entropy) patched in."""
    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    from transformers import LlamaForCausalLM

    config = llama_config(m)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.tie_weights()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    assert all(p.dtype == dtype for p in model.parameters())
    model.train()
    return torch.compile(model) if variant == "compile" else model


def run_hf(model_yaml: dict, seq_length: int, micro_batch_size: int, steps: int, warmup: int, *,
           lr: float = 3e-4, clip_grad: float | None = None, device: str = "cuda", seed: int = 1234,
           variant: str = "eager") -> dict:
    """Train `steps` steps (the first `warmup` untimed) and return the timed steps' throughput.

    Returns tokens_per_s and mfu (mean over the timed steps: tokens / total time), peak_mem_gb
    (torch.cuda.max_memory_allocated in GiB, reset after the model is built, so it holds weights,
    gradients, optimizer state and activations, like ShardForge's metrics), step_time_s (mean),
    step_time_median_s and losses (every step's loss, warmup included).
    """
    timed = steps - warmup
    if timed < 1:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(seed)
    if cuda:
        torch.cuda.manual_seed(seed)
    dtype = torch.bfloat16 if cuda else torch.float32

    model = build_model(model_yaml, dev, dtype, variant)
    n_params = sum(p.numel() for p in model.parameters())
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=cuda)

    # Random tokens, a few distinct batches in rotation so no step sees a cached input.
    gen = torch.Generator(device=dev).manual_seed(seed)
    batches = [torch.randint(0, model_yaml["vocab_size"], (micro_batch_size, seq_length), device=dev, generator=gen)
               for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        tokens = batches[i % len(batches)]
        loss = model(input_ids=tokens, labels=tokens).loss  # HF shifts the labels inside
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses: list[torch.Tensor] = []
    for i in range(warmup):
        losses.append(step(i))
    times: list[float] = []
    if cuda:
        torch.cuda.synchronize(dev)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(timed)]
        for i, (start, end) in enumerate(events):
            start.record()
            losses.append(step(warmup + i))
            end.record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for i in range(timed):
            t0 = time.perf_counter()
            losses.append(step(warmup + i))
            times.append(time.perf_counter() - t0)

    tokens_per_step = micro_batch_size * seq_length
    mean_t = sum(times) / len(times)
    tokens_per_s = tokens_per_step / mean_t
    flops_per_token = train_flops_per_token(seq_length=seq_length, **flops_shape(model_yaml))
    peak = peak_flops(dev)
    loss_values = [float(x) for x in torch.stack(losses).float().cpu()]
    if not all(math.isfinite(x) for x in loss_values):
        raise RuntimeError(f"non-finite loss in HF baseline: {loss_values}")
    result = {
        "framework": f"hf-{variant}",
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else None,
        "step_time_s": mean_t,
        "step_time_median_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "timed_steps": timed,
        "warmup_steps": warmup,
        "losses": loss_values,
        "params": n_params,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "seq_length": seq_length,
        "micro_batch_size": micro_batch_size,
        "clip_grad": clip_grad,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
    }
    import transformers

    result["transformers"] = transformers.__version__
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_1b", help="conf/model/<name>.yaml, or a yaml path")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="total steps, warmup included")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip-grad", type=float, default=None, help="clip the global grad norm (off by default)")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test only)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--out", help="also write the result JSON to this file")
    p.add_argument("--variant", choices=VARIANTS, default="eager", help="eager | compile (torch.compile) | liger")
    a = p.parse_args(argv)
    if a.steps - a.warmup < 20 and a.device == "cuda":
        print(f"hf_baseline: warning: only {a.steps - a.warmup} timed steps (>= 20 recommended)", file=sys.stderr)
    result = run_hf(load_model_yaml(a.model), a.seq_length, a.micro_batch_size, a.steps, a.warmup,
                    lr=a.lr, clip_grad=a.clip_grad, device=a.device, variant=a.variant)
    result["model"] = a.model
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    if a.json:
        print(json.dumps(result))
    else:
        mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
        mem = f"{result['peak_mem_gb']:.1f} GiB" if result["peak_mem_gb"] is not None else "n/a"
        print(f"hf-{a.variant} {a.model} seq={a.seq_length} mbs={a.micro_batch_size} on {result['device']}: "
              f"{result['tokens_per_s']:.0f} tok/s, MFU {mfu}, peak mem {mem}, "
              f"step {result['step_time_s'] * 1e3:.1f} ms (median {result['step_time_median_s'] * 1e3:.1f}), "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
    return result


if __name__ == "__main__":
    main()
