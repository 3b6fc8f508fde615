"""Single process, fp32 CPU: the tiny model's training loss through the fused output layer +
cross entropy equals megatron's logits + cross entropy path — per-token losses and every
parameter gradient — for a dense batch (tied and untied embeddings) and a packed one: the LM form
under c · Σ mask · loss, and the per-token form (the preference objectives') under a different
weight for every token, in training and in eval mode."""
from __future__ import annotations

import os

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from omegaconf import OmegaConf

from models.args import ModelArgs
from models.fused_loss import LinearCrossEntropyGPTModel, LinearTokenLossGPTModel
from models.padded_vocab import PaddedVocabGPTModel
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def losses_and_grads(ddp, cls: type, batch: dict, packed, weights: torch.Tensor):
    """Per-token losses through the loss slot class `cls` (the same modules: models/kernel_provider.py
    model_class), and every parameter's gradient of Σ weights · loss (megatron's DDP moves each into
    the parameter's main_grad)."""
    model = ddp.module
    model.__class__ = cls
    ddp.zero_grad_buffer()
    calls = []  # the fused paths must not run the output layer (no logits)
    hook = model.output_layer.register_forward_hook(lambda *_: calls.append(1))
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["mask"],
                   packed_seq_params=packed)
    hook.remove()
    assert len(calls) == (1 if cls is PaddedVocabGPTModel else 0), (cls, calls)
    (losses * weights).sum().backward()
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    assert len(grads) >= 9 and all(g.abs().sum() > 0 for g in grads.values()), "no gradients reached main_grad"
    return losses.detach(), grads


def assert_same(got, want) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        # within 1e-5 of the gradient's largest value (sums over every token: fp32 ordering)
        error = (grads[name] - ref_grads[name]).abs().max().item()
        assert error <= 1e-5 * ref_grads[name].abs().max().item(), (name, error)


def main() -> None:
    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=3)
    g = torch.Generator().manual_seed(0)
    for tied in (False, True):
        cfg = OmegaConf.load(f"{REPO}/conf/model/tiny.yaml")
        cfg.tie_word_embeddings = tied
        args = ModelArgs.from_config(cfg)
        engine = MegatronEngine(args, Layout(world_size=1), OptimConfig(), steps=1,
                                seq_length=64, micro_batch_size=2, seed=3, device=torch.device("cpu"),
                                params_dtype=torch.float32, recompute=None, backend="torch")
        ddp = engine.chunks[0]
        model = ddp.module
        model.train()
        dense = {"tokens": torch.randint(0, 4096, (2, 64), generator=g), "labels": torch.randint(0, 4096, (2, 64), generator=g),
                 "position_ids": torch.arange(64).repeat(2, 1), "mask": (torch.rand(2, 64, generator=g) > 0.3).float()}
        cu = torch.tensor([0, 20, 29, 64], dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=35, max_seqlen_kv=35)
        thd = {k: v[:1] for k, v in dense.items()}
        thd["position_ids"] = torch.cat([torch.arange(20), torch.arange(9), torch.arange(35)]).unsqueeze(0)
        for batch, params in ((dense, None), (thd, packed)):
            uniform = batch["mask"] * 0.37  # c · Σ mask · loss, any c
            assert_same(losses_and_grads(ddp, LinearCrossEntropyGPTModel, batch, params, uniform),
                        losses_and_grads(ddp, PaddedVocabGPTModel, batch, params, uniform))
            # a weight of its own for every token, signs mixed (a DPO pair's chosen and rejected sides)
            each = batch["mask"] * torch.randn(batch["mask"].shape, generator=g)
            assert_same(losses_and_grads(ddp, LinearTokenLossGPTModel, batch, params, each),
                        losses_and_grads(ddp, PaddedVocabGPTModel, batch, params, each))
            model.eval()  # the reference pass's forward: the per-token form serves it too
            outs = []
            with torch.no_grad():
                for cls in (LinearTokenLossGPTModel, PaddedVocabGPTModel):
                    model.__class__ = cls
                    outs.append(model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                                      loss_mask=batch["mask"], packed_seq_params=params))
            torch.testing.assert_close(*outs, rtol=1e-5, atol=1e-5)
            model.train()
    print("FUSED LOSS OK", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
