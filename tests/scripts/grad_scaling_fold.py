"""Single process, fp32 CPU: training with the per-token and clip scales applied inside the fused
AdamW step (parallel/grad_scaling.py) against megatron-core's own path (finalize_model_grads
scales the grads by 1/tokens, the optimizer clips them), same model, seed and batches: per-step
loss, grad norm and the final weights, with clipping active and with it off."""
from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from models.args import ModelArgs
from parallel.grad_scaling import FoldedGradScaling
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(folded: bool, clip_grad: float) -> tuple[list[tuple[float, float]], list[torch.Tensor]]:
    optim = OptimConfig(clip_grad=clip_grad,
                        eps=1e-3)  # near the grads' size, so the update depends on their scale (Adam otherwise mostly does not)
    args = ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/tiny.yaml"))
    engine = MegatronEngine(args, Layout(world_size=1), optim, steps=4, seq_length=32, micro_batch_size=2, seed=3,
                            device=torch.device("cpu"), params_dtype=torch.float32, recompute=None, backend="torch")
    assert (engine.grad_scaling is not None) is folded
    g = torch.Generator().manual_seed(7)
    results = []
    for _ in range(4):
        micro = []
        for _ in range(2):  # uneven loss masks: the token count differs per micro batch
            tokens = torch.randint(0, args.vocab_size, (2, 33), generator=g)
            micro.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(32).repeat(2, 1),
                          "loss_mask": (torch.rand(2, 32, generator=g) > 0.4).float()})
        r = engine.train_step(micro)
        results.append((r.loss_sum / r.num_tokens, r.grad_norm))
    return results, [p.detach().clone() for p in engine.chunks[0].parameters()]


def main() -> None:
    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=3)
    applies = FoldedGradScaling.applies
    try:
        for clip in (0.05, 0.0):
            folded, folded_weights = train(True, clip)
            FoldedGradScaling.applies = staticmethod(lambda optimizer: False)
            reference, reference_weights = train(False, clip)
            FoldedGradScaling.applies = applies
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(folded, reference), 1):
                assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (clip, step, loss, ref_loss)
                assert abs(norm - ref_norm) <= 1e-6 * ref_norm, (clip, step, norm, ref_norm)
            if clip:
                assert folded[0][1] > clip, "clipping must be active in this case"
            for w, ref in zip(folded_weights, reference_weights):
                assert (w - ref).abs().max() <= 1e-5 * ref.abs().max(), (clip, (w - ref).abs().max())
            print(f"clip {clip}: losses {[round(x, 6) for x, _ in folded]} norms {[round(n, 6) for _, n in folded]}")
    finally:
        shutdown()
    print("GRAD SCALING FOLD OK")


if __name__ == "__main__":
    main()
