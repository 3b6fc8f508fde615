"""Weight gradients accumulated into the fp32 main grads inside the GEMM (parallel/grad_accum_fusion.py)
on the GPU:
- the op against an fp32 matmul of the same bf16 inputs added to the same main grad;
- two training steps of a bf16 model with megatron's gradient_accumulation_fusion on (the torch
  op) against the same model with it off (bf16 wgrad + hook add): losses and grad norms within
  the bf16 tolerance 1e-2, per step."""
from __future__ import annotations

import pytest
import torch

from parallel import grad_accum_fusion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def test_wgrad_accumulates_in_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4096, 768, device="cuda", generator=g).bfloat16()
    main_grad = torch.randn(768, 1024, device="cuda", generator=g)
    ref = main_grad + dy.float().t() @ x.float()
    grad_accum_fusion.wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert ((main_grad - ref).norm() / ref.norm()).item() < 1e-5


def _two_steps(build_engine, fused: bool) -> list[tuple[float, float]]:
    args, engine = build_engine("tiny", seed=3, seq_length=128, micro_batch_size=2, params_dtype=torch.bfloat16,
                                steps=2, fusion=fused)
    assert engine.config.gradient_accumulation_fusion is fused
    g = torch.Generator().manual_seed(1)
    results = []
    for _ in range(2):
        batches = []
        for _ in range(2):  # two micro batches: the second accumulates into the first's main grads
            tokens = torch.randint(0, args.vocab_size, (2, 129), generator=g)
            batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                            "loss_mask": torch.ones(2, 128), "position_ids": torch.arange(128).expand(2, 128)})
        r = engine.train_step(batches)
        results.append((r.loss_sum / r.num_tokens, r.grad_norm))
    return results


def test_training_with_fusion_matches_unfused(build_engine):
    fused, unfused = _two_steps(build_engine, True), _two_steps(build_engine, False)
    for (loss, norm), (ref_loss, ref_norm) in zip(fused, unfused):
        assert abs(loss - ref_loss) / ref_loss < 1e-2, (fused, unfused)
        assert abs(norm - ref_norm) / ref_norm < 1e-2, (fused, unfused)
