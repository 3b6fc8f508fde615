"""The DPO peer: TRL's DPOTrainer on the bench's preference pairs, timed per optimizer step.

    python -m bench.trl_dpo --model llama3_1b --pairs PAIRS_JSONL --tokenizer HF_TOKENIZER_DIR \
        --batch-pairs 4 --max-length 1024 --steps 30 --warmup 10 --out ROW_JSON

The model is bench.hf_baseline's (the same shape yaml, SDPA, bf16 weights on CUDA) with liger-kernel's
layer kernels (RoPE, RMSNorm, SwiGLU) patched in for `--variant liger`; TRL computes the per-token
log-probs through its own chunked LM head, so liger's fused linear cross entropy is not applied (TRL
refuses it). The reference log-probs are precomputed before training (`precompute_ref_log_probs`),
as ShardForge's default reference does, so no reference model is held during the timed steps. Each
step's batch is padded to its longest sequence (TRL's collator); a step's trained tokens are the
batch's attention-mask ones (prompt and response of both sides, no padding).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.hf_baseline import build_model, load_model_yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_1b")
    p.add_argument("--pairs", required=True, help="jsonl of {prompt, chosen, rejected} strings")
    p.add_argument("--tokenizer", required=True, help="an HF tokenizer directory")
    p.add_argument("--batch-pairs", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024, help="per side (prompt + response)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--variant", choices=["eager", "liger"], default="liger")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    if a.variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    shape = load_model_yaml(a.model)
    model = build_model(shape, dev, torch.bfloat16 if cuda else torch.float32, "eager")
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in Path(a.pairs).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)

    steps: list[dict[str, float]] = []

    class Trainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            steps.append({"tokens": tokens, "pairs": int(inputs["input_ids"].size(0)) // 2,
                          "row_tokens": int(inputs["input_ids"].numel())})
            return super().training_step(model, inputs, num_items_in_batch)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            steps[-1]["seconds"] = time.perf_counter() - self.start

    config = DPOConfig(output_dir=str(Path(a.out).with_suffix(".trainer")), per_device_train_batch_size=a.batch_pairs,
                       max_steps=a.steps, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
                       beta=a.beta, max_length=a.max_length, truncation_mode="keep_end",
                       precompute_ref_log_probs=True, bf16=cuda, logging_steps=1, save_strategy="no",
                       report_to=[], dataloader_num_workers=0, disable_dropout=True, seed=0,
                       gradient_checkpointing=False, use_cpu=not cuda)
    trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    trainer.train()
    timed = steps[a.warmup:]
    seconds = sum(s["seconds"] for s in timed)
    row = {"framework": f"TRL DPOTrainer ({a.variant})", "trained_tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
           "row_tokens_per_s": sum(s["row_tokens"] for s in timed) / seconds,
           "pairs_per_s": sum(s["pairs"] for s in timed) / seconds, "step_time_s": seconds / len(timed),
           "padding_fraction": 1 - sum(s["tokens"] for s in timed) / sum(s["row_tokens"] for s in timed),
           "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
           "timed_steps": len(timed), "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    Path(a.out).write_text(json.dumps(row))
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
