"""Single process, fp32 CPU: training with torch.compile'd transformer layers (train.compile)
against the same model in eager mode, same seed and batches — per-step loss and grad norm within
1e-5 — for a dense batch (no recompute, selective and full recompute) and a packed one; and without recompute inside the layer (none, full: megatron checkpoints whole
layers from outside) the layers trace as whole graphs. Selective recompute inside a layer breaks
its graph (megatron's checkpoint saves the RNG state), and so do a packed batch's data-dependent
document lengths: still correct."""
from __future__ import annotations

import os

import torch
import torch._dynamo
from omegaconf import OmegaConf

from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 32


def batches(vocab: int, packed: bool) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(3):
        tokens = torch.randint(0, vocab, (2, SEQ + 1), generator=g)
        b = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(SEQ).repeat(2, 1),
             "loss_mask": (torch.rand(2, SEQ, generator=g) > 0.2).float()}
        if packed:  # two rows of documents 11 + 21 and 32 as one THD stream
            b["cu_seqlens"] = torch.tensor([0, 11, 32, 64], dtype=torch.int32)
            b["position_ids"] = torch.cat([torch.arange(11), torch.arange(21), torch.arange(32)]).reshape(2, SEQ)
        steps.append([b])
    return steps


def train(compiled: bool, recompute, packed: bool) -> list[tuple[float, float]]:
    args = ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/tiny.yaml"))
    engine = MegatronEngine(args, Layout(world_size=1), OptimConfig(), steps=3,
                            seq_length=SEQ, micro_batch_size=2, seed=3, device=torch.device("cpu"),
                            params_dtype=torch.float32, recompute=recompute, backend="torch", compile=compiled)
    layers = engine.chunks[0].module.module.decoder.layers if hasattr(engine.chunks[0].module, "module") \
        else engine.chunks[0].module.decoder.layers
    assert all((layer._compiled_call_impl is not None) is compiled for layer in layers)
    out = []
    for micro in batches(args.vocab_size, packed):
        r = engine.train_step(micro)
        out.append((r.loss_sum / r.num_tokens, r.grad_norm))
    return out


def main() -> None:
    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=3)
    try:
        for recompute, packed in ((None, False), ("selective", False), ("full", False), (None, True)):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = train(True, recompute, packed)
            breaks = dict(torch._dynamo.utils.counters["graph_break"])
            assert not breaks or packed or recompute not in (None, "full"), (recompute, packed, breaks)
            eager = train(False, recompute, packed)
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(compiled, eager), 1):
                assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (recompute, packed, step, loss, ref_loss)
                assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (recompute, packed, step, norm, ref_norm)
            print(f"recompute={recompute} packed={packed}: {[round(x, 6) for x, _ in compiled]}", flush=True)
    finally:
        shutdown()
    print("COMPILED LAYERS OK")


if __name__ == "__main__":
    main()
