"""Single process, fp32 CPU: the tiny model's training loss through the fused output layer +
cross entropy equals megatron's logits + cross entropy path — per-token losses and every
parameter gradient — for a dense batch (tied and untied embeddings) and a packed one."""
from __future__ import annotations

import os

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from omegaconf import OmegaConf

from models.args import ModelArgs
from models.fused_loss import LinearCrossEntropyGPTModel
from models.padded_vocab import PaddedVocabGPTModel
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def losses_and_grads(model, fused: bool, batch: dict, packed):
    # the same modules as the loss slot's two classes (models/kernel_provider.py model_class)
    model.__class__ = LinearCrossEntropyGPTModel if fused else PaddedVocabGPTModel
    model.zero_grad(set_to_none=True)
    calls = []  # the fused path must not run the output layer (no logits)
    hook = model.output_layer.register_forward_hook(lambda *_: calls.append(1))
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["mask"],
                   packed_seq_params=packed)
    hook.remove()
    assert len(calls) == (0 if fused else 1), (fused, calls)
    (losses * batch["mask"]).sum().mul(0.37).backward()  # c · Σ mask · loss, any c
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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
        model = engine.chunks[0].module
        model.train()
        dense = {"tokens": torch.randint(0, 4096, (2, 64), generator=g), "labels": torch.randint(0, 4096, (2, 64), generator=g),
                 "position_ids": torch.arange(64).repeat(2, 1), "mask": (torch.rand(2, 64, generator=g) > 0.3).float()}
        cu = torch.tensor([0, 20, 29, 64], dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=35, max_seqlen_kv=35)
        thd = {k: v[:1] for k, v in dense.items()}
        thd["position_ids"] = torch.cat([torch.arange(20), torch.arange(9), torch.arange(35)]).unsqueeze(0)
        for batch, params in ((dense, None), (thd, packed)):
            ref_loss, ref_grads = losses_and_grads(model, False, batch, params)
            loss, grads = losses_and_grads(model, True, batch, params)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            assert grads.keys() == ref_grads.keys()
            for name in ref_grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    print("FUSED LOSS OK", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
