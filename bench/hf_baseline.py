"""HF transformers baselines for bench/: the same model shape, trained the plain way.

`LlamaForCausalLM` built from a `LlamaConfig` (random init, `attn_implementation="sdpa"`, bf16
parameters), `torch.optim.AdamW(fused=True)`. Throughput is timed with CUDA events over the steps
after warmup; MFU uses the project's one formula (launcher.flops), so it compares directly with
ShardForge's metrics.jsonl.

Two workloads, one training/timing loop:
  * dense (bench/bench_train.py): random token batches of shape [micro_batch_size, seq_length].
  * packed SFT (bench/bench_packed.py, `--sft-data PREFIX`): the conversations of an indexed SFT
    dataset written by `launcher.preprocess format=sft`, read with the project's reader
    (IndexedDataset + SFTSamples: same truncation to seq_length, same dropped samples), taken in
    order until the next would overflow micro_batch_size x seq_length tokens, and collated with
    `transformers.DataCollatorWithFlattening` (one [1, T] row, position_ids restarting per
    conversation, no attention_mask, no padding). Labels are -100 where ShardForge's loss mask
    is 0, so both train on the same tokens. With SDPA, transformers (>= 4.5x; masking_utils)
    detects the packed format from the position_ids and builds a block-causal mask; a check on
    the first batch (`check_isolation`) fails the run if any conversation sees another.

    python -m bench.hf_baseline --model llama3_1b --seq-length 4096 --micro-batch-size 2 --json
    python -m bench.hf_baseline --sft-data /tmp/x/chat --variant liger --json   # packed SFT peer
    python -m bench.hf_baseline --sft-data /tmp/x/chat --variant liger --lora-rank 16   # + peft LoRA

With `--lora-rank N` (bench/bench_lora.py) the model is wrapped by `peft.get_peft_model` after it is
built (and after liger's patches): LoRA of rank N on q/k/v/o/gate/up/down, `--lora-alpha`, no
dropout; the base frozen and only the adapters in the optimizer. Adapters are fp32 on the bf16 base
(peft's default, `autocast_adapter_dtype`) unless `--lora-dtype bf16`.
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
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/hf_baseline.py` as well as `python -m bench.hf_baseline`
    sys.path.insert(0, str(REPO))

from bench.results_io import invocation, write_result  # noqa: E402
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
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, adapter_dtype: str = "fp32") -> torch.nn.Module:
    """`peft.get_peft_model` with LoRA of `rank` on every linear of the decoder layers (no dropout);
    adapter_dtype fp32: peft's default (adapters upcast on a bf16 base), bf16: the base's dtype."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                             bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "fp32")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The LlamaForCausalLM inside `model` (unwrapped from torch.compile and from a peft wrapper)."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build_model(m: dict[str, Any], device: torch.device, dtype: torch.dtype, variant: str = "eager",
                gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None):
    """The HF model as a user would run it: eager (SDPA), `torch.compile`d, or with liger-kernel's
    Triton kernels (RoPE, RMSNorm, SwiGLU, fused linear cross entropy) patched in; with
    `gradient_checkpointing`, each decoder layer recomputed in the backward (transformers' own,
    non-reentrant), as long-context users run it; with `lora` (apply_lora's keyword arguments), wrapped
    by peft."""
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
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = apply_lora(model, **lora)
    return torch.compile(model) if variant == "compile" else model


def _setup(model_yaml: dict, device: str, seed: int, variant: str, gradient_checkpointing: bool = False,
           lora: dict[str, Any] | None = None) -> tuple[torch.device, torch.nn.Module]:
    dev = torch.device(device)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed(seed)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, build_model(model_yaml, dev, dtype, variant, gradient_checkpointing, lora)


def train_timed(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, warmup: int,
                dev: torch.device, *, lr: float, clip_grad: float | None) -> tuple[list[float], list[float]]:
    """Train `steps` steps on `batches[i % len(batches)]` (model keyword arguments, labels included);
    returns (every step's loss, warmup included; the timed steps' seconds).

    Peak memory counters are reset first, so they hold weights, gradients, optimizer state and
    activations, like ShardForge's metrics. CUDA steps are timed with CUDA events.
    """
    timed = steps - warmup
    if timed < 1:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}")
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    params = [p for p in model.parameters() if p.requires_grad]  # under LoRA: the adapters only
    optimizer = torch.optim.AdamW(params, lr=lr, fused=cuda)

    def step(i: int) -> torch.Tensor:
        loss = model(**batches[i % len(batches)]).loss  # HF shifts the labels inside
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
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
    loss_values = [float(x) for x in torch.stack(losses).float().cpu()]
    if not all(math.isfinite(x) for x in loss_values):
        raise RuntimeError(f"non-finite loss in HF baseline: {loss_values}")
    return loss_values, times


def summarize(framework: str, model: torch.nn.Module, model_yaml: dict, dev: torch.device, *, seq_length: int,
              micro_batch_size: int, tokens: list[int], times: list[float], losses: list[float], warmup: int,
              clip_grad: float | None) -> dict:
    """The result of a timed run; `tokens[i]` are the token positions computed in timed step i.

    tokens_per_s and mfu are totals over the timed steps (sum of tokens / sum of time); MFU counts
    launcher.flops' per-token FLOPs at `seq_length`, as ShardForge's metrics do.
    """
    cuda = dev.type == "cuda"
    total_t = sum(times)
    tokens_per_s = sum(tokens) / total_t
    flops_per_token = train_flops_per_token(seq_length=seq_length, **flops_shape(model_yaml))
    peak = peak_flops(dev)
    import transformers

    return {
        "framework": framework,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else None,
        "step_time_s": total_t / len(times),
        "step_time_median_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "timed_steps": len(times),
        "warmup_steps": warmup,
        "losses": losses,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "seq_length": seq_length,
        "micro_batch_size": micro_batch_size,
        "clip_grad": clip_grad,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_hf(model_yaml: dict, seq_length: int, micro_batch_size: int, steps: int, warmup: int, *,
           lr: float = 3e-4, clip_grad: float | None = None, device: str = "cuda", seed: int = 1234,
           variant: str = "eager",
           gradient_checkpointing: bool = False) -> dict:
    """Dense: train `steps` steps on random [micro_batch_size, seq_length] batches (the first `warmup`
    untimed) and return the timed steps' throughput.

    Returns tokens_per_s and mfu (over the timed steps: tokens / total time), peak_mem_gb
    (torch.cuda.max_memory_allocated in GiB), step_time_s (mean), step_time_median_s and losses
    (every step's loss, warmup included).
    """
    if steps - warmup < 1:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}")
    dev, model = _setup(model_yaml, device, seed, variant, gradient_checkpointing)
    # Random tokens, a few distinct batches in rotation so no step sees a cached input.
    gen = torch.Generator(device=dev).manual_seed(seed)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, model_yaml["vocab_size"], (micro_batch_size, seq_length), device=dev, generator=gen)
        batches.append({"input_ids": tokens, "labels": tokens})
    losses, times = train_timed(model, batches, steps, warmup, dev, lr=lr, clip_grad=clip_grad)
    return summarize(f"hf-{variant}", model, model_yaml, dev, seq_length=seq_length,
                     micro_batch_size=micro_batch_size, tokens=[micro_batch_size * seq_length] * len(times),
                     times=times, losses=losses, warmup=warmup, clip_grad=clip_grad)


# --- packed SFT: the padding-free peer of bench/bench_packed.py ------------------------------------------------


def sft_samples(prefix: str | Path, seq_length: int):
    """The conversations ShardForge's `data.format=sft` run reads from `prefix` (launcher.preprocess
    output), through the project's reader: cut to seq_length, samples without a target dropped."""
    from launcher.data.indexed import IndexedDataset
    from launcher.data.sft import SFTSamples

    return SFTSamples(IndexedDataset(prefix), seq_length)


def _steps_in_order(lengths: Any, token_budget: int, steps: int,
                    positions: Callable[[list[int]], int]) -> list[list[int]]:
    """Sample indices of each step: samples in order (wrapping at the end of the set), taken until the
    next one would make the step's `positions(its lengths)` exceed `token_budget`; a step never holds
    a sample twice."""
    n = len(lengths)
    out, k = [], 0
    for _ in range(steps):
        chosen: list[int] = []
        held: list[int] = []
        while len(chosen) < n:
            length = int(lengths[k % n])
            if positions([*held, length]) > token_budget:
                if not chosen:
                    raise ValueError(f"sample {k % n} has {length} tokens, more than the budget {token_budget}")
                break
            chosen.append(k % n)
            held.append(length)
            k += 1
        out.append(chosen)
    return out


def packed_sft_steps(lengths: Any, token_budget: int, steps: int) -> list[list[int]]:
    """Each step's samples, in order, flattened into at most `token_budget` tokens."""
    return _steps_in_order(lengths, token_budget, steps, sum)


def padded_sft_steps(lengths: Any, token_budget: int, steps: int) -> list[list[int]]:
    """Each step's samples, in order, as rows padded to the step's longest: at most `token_budget` positions."""
    return _steps_in_order(lengths, token_budget, steps, lambda held: len(held) * max(held))


def padded_batch(samples, indices: list[int]) -> dict[str, torch.Tensor]:
    """One padded micro batch: a row per sample, right-padded to the longest, labels -100 on the
    padding. No attention mask: under the causal mask a real token never sees the padding after it,
    so SDPA keeps its fast causal kernels (a padding mask would force a masked kernel)."""
    features = [sft_features(samples, k) for k in indices]
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), longest, dtype=torch.long)
    labels = torch.full((len(features), longest), -100, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.as_tensor(f["input_ids"].astype("int64"))
        labels[row, :n] = torch.as_tensor(f["labels"].astype("int64"))
    return {"input_ids": input_ids, "labels": labels}


def sft_features(samples, k: int) -> dict[str, Any]:
    """Sample k as a collator feature: labels are the ids where ShardForge's target mask is 1, else -100.

    ShardForge trains row position j on ids[j + 1] where mask[j + 1] is 1 (launcher.data.packing.build_row);
    HF shifts the labels inside the loss, so label j here is ids[j] (or -100) and the same tokens are targets.
    """
    import numpy as np

    ids, mask = samples.sample(k)
    return {"input_ids": ids, "labels": np.where(mask.astype(bool), ids, -100)}


def flatten_batch(samples, indices: list[int]) -> dict[str, torch.Tensor]:
    """One padding-free micro batch: `transformers.DataCollatorWithFlattening` over the samples `indices`
    (input_ids, labels and position_ids of shape [1, total tokens]; each sample's first label is -100)."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_tensors="pt")([sft_features(samples, k) for k in indices])


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss (HF drops label 0 when shifting; the collator made it -100 anyway)."""
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def check_isolation(model: torch.nn.Module, batch: dict[str, torch.Tensor], vocab_size: int) -> dict[str, float]:
    """Change every token of the batch's first sample: the other samples' final hidden states must not move.

    This is what packed training needs from the attention (no sample sees another) and does not depend
    on how the installed transformers builds its mask. Raises RuntimeError on a leak.
    """
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2:
        raise ValueError("check_isolation needs a batch of two samples or more")
    end = starts[1]
    decoder = causal_lm(model).model
    ids = batch["input_ids"]
    other = ids.clone()
    other[:, :end] = (other[:, :end] + 1) % vocab_size
    h0 = decoder(input_ids=ids, position_ids=batch["position_ids"]).last_hidden_state.float()
    h1 = decoder(input_ids=other, position_ids=batch["position_ids"]).last_hidden_state.float()
    own = float((h1[:, :end] - h0[:, :end]).abs().max())
    leak = float((h1[:, end:] - h0[:, end:]).abs().max())
    if not own > 0 or leak > 1e-3 * own:
        raise RuntimeError(f"packed samples are not isolated: changing sample 0 moved its own hidden states by "
                           f"{own:.3g} and the {len(starts) - 1} later samples' by {leak:.3g} (attention crosses "
                           f"samples: this transformers does not build a block-causal mask from position_ids)")
    return {"isolation_own_change": own, "isolation_leak": leak, "isolation_samples": len(starts)}


def run_hf_packed(model_yaml: dict, sft_data: str | Path, seq_length: int, micro_batch_size: int, steps: int,
                  warmup: int, *, lr: float = 3e-4, clip_grad: float | None = None, device: str = "cuda",
                  seed: int = 1234, variant: str = "eager",
                  gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None,
                  layout: str = "packed") -> dict:
    """Packed SFT with DataCollatorWithFlattening: each step one flattened batch of at most
    micro_batch_size x seq_length tokens (conversations in dataset order), same optimizer and timing as run_hf.
    layout="padded": each step a row per conversation, right-padded to the step's longest, as many as fit
    the same micro_batch_size x seq_length positions (padded_batch).

    Adds loss_tokens_per_s (tokens with a label, over the timed steps), budget_fill (share of the
    token budget used), samples_per_step and the isolation check's numbers to run_hf's result.
    """
    if steps - warmup < 1:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}")
    samples = sft_samples(sft_data, seq_length)
    budget = micro_batch_size * seq_length
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout {layout!r}: packed or padded")
    padded = layout == "padded"
    plan = (padded_sft_steps if padded else packed_sft_steps)(samples.lengths, budget, steps)
    dev, model = _setup(model_yaml, device, seed, variant, gradient_checkpointing, lora)
    # Every step's batch on the device before the clock starts (as the dense baseline's batches are).
    collate = padded_batch if padded else flatten_batch
    batches = [{k: v.to(dev) for k, v in collate(samples, idx).items()} for idx in plan]
    probe = None if padded else next((b for b in batches if int((b["position_ids"] == 0).sum()) > 1), None)
    isolation = check_isolation(model, probe, model_yaml["vocab_size"]) if probe is not None else {}
    losses, times = train_timed(model, batches, steps, warmup, dev, lr=lr, clip_grad=clip_grad)
    timed = batches[warmup:]
    name = f"hf-{variant}" + (f"-peft-lora{lora['rank']}" if lora else "") + f"-{layout}"
    result = summarize(name, model, model_yaml, dev, seq_length=seq_length,
                       micro_batch_size=micro_batch_size, tokens=[b["input_ids"].numel() for b in timed],
                       times=times, losses=losses, warmup=warmup, clip_grad=clip_grad)
    timed_loss_tokens = sum(loss_tokens(b) for b in timed)
    result.update({
        "loss_tokens_per_s": timed_loss_tokens / sum(times),
        "loss_tokens": timed_loss_tokens,
        "token_budget": budget,
        "budget_fill": sum(b["input_ids"].numel() for b in timed) / (budget * len(timed)),
        "samples_per_step": sum(len(idx) for idx in plan[warmup:]) / len(timed),
        "layout": layout,
        "padding_fraction": 1 - sum(int(samples.lengths[k]) for idx in plan[warmup:] for k in idx)
        / sum(b["input_ids"].numel() for b in timed),
        "sft_data": str(sft_data),
        "samples_in_set": len(samples),
        "truncated": samples.truncated,
        "dropped": samples.dropped,
        "lora": lora,
        **isolation,
    })
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
    p.add_argument("--out", help="result JSON (default: bench/results/<date>_<device>_hf.json; never overwritten)")
    p.add_argument("--no-record", action="store_true", help="print only; write no result file")
    p.add_argument("--variant", choices=VARIANTS, default="eager", help="eager | compile (torch.compile) | liger")
    p.add_argument("--memory-snapshot", metavar="DIR",
                   help="record CUDA allocations over the whole run; write DIR/memory/snapshot.pickle and DIR/memory/peak.txt "
                        "(what was live at the peak, by allocating line: launcher.profiling.peak_report)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward (long sequences)")
    p.add_argument("--sft-data", metavar="PREFIX",
                   help="packed SFT instead of random tokens: the indexed dataset PREFIX written by "
                        "`launcher.preprocess format=sft`, flattened with DataCollatorWithFlattening "
                        "(at most micro batch x seq length tokens per step)")
    p.add_argument("--sft-layout", choices=("packed", "padded"), default="packed",
                   help="with --sft-data: packed (flattened, no padding) or padded (a row per conversation)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="with --sft-data: train peft LoRA adapters of this rank on every linear (0: full parameters)")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="the adapters' dtype: fp32 (peft's default on a bf16 base) or bf16")
    a = p.parse_args(argv)
    if a.lora_rank and not a.sft_data:
        p.error("--lora-rank needs --sft-data")
    if a.steps - a.warmup < 20 and a.device == "cuda":
        print(f"hf_baseline: warning: only {a.steps - a.warmup} timed steps (>= 20 recommended)", file=sys.stderr)
    common = dict(lr=a.lr, clip_grad=a.clip_grad, device=a.device, variant=a.variant,
                  gradient_checkpointing=a.gradient_checkpointing)
    if a.memory_snapshot:  # same report as ShardForge's logging.memory_snapshot
        from launcher.profiling import record_memory_history

        record_memory_history(a.steps, torch.device(a.device))
    if a.sft_data:
        lora = dict(rank=a.lora_rank, alpha=a.lora_alpha, adapter_dtype=a.lora_dtype) if a.lora_rank else None
        result = run_hf_packed(load_model_yaml(a.model), a.sft_data, a.seq_length, a.micro_batch_size, a.steps,
                               a.warmup, lora=lora, layout=a.sft_layout, **common)
    else:
        result = run_hf(load_model_yaml(a.model), a.seq_length, a.micro_batch_size, a.steps, a.warmup, **common)
    result["model"] = a.model
    if a.memory_snapshot:  # (a no-op off CUDA, like record_memory_history)
        from launcher.profiling import MemorySnapshot

        MemorySnapshot(a.steps, a.memory_snapshot, torch.device(a.device)).after_step(a.steps)
    if not a.no_record:
        path = write_result(a.out, "hf", invocation("bench.hf_baseline", argv), [result], args=vars(a))
        print(f"hf_baseline: wrote {path}", file=sys.stderr)
    if a.json:
        print(json.dumps(result))
    else:
        mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
        mem = f"{result['peak_mem_gb']:.1f} GiB" if result["peak_mem_gb"] is not None else "n/a"
        trained = f", {result['loss_tokens_per_s']:.0f} loss tok/s" if "loss_tokens_per_s" in result else ""
        print(f"{result['framework']} {a.model} seq={a.seq_length} mbs={a.micro_batch_size} on {result['device']}: "
              f"{result['tokens_per_s']:.0f} tok/s{trained}, MFU {mfu}, peak mem {mem}, "
              f"step {result['step_time_s'] * 1e3:.1f} ms (median {result['step_time_median_s'] * 1e3:.1f}), "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
    return result


if __name__ == "__main__":
    main()
