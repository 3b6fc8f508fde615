"""Under torchrun: the same documents trained packed (THD rows, cu_seqlens) and unpacked (one
padded row per document) give the same loss and gradients; prints one JSON line on rank 0.

    packed_vs_unpacked TP PP
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from omegaconf import OmegaConf

from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S, MBS = 64, 2


def documents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(4, 40, (12,), generator=g).tolist()
    return [torch.randint(5, 4096, (n,), generator=g) for n in lengths]


def labelled(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Next-token labels inside the document; the last token has no label (mask 0).
    labels = torch.cat([doc[1:], doc[:1]])
    mask = torch.ones(len(doc))
    mask[-1] = 0
    return labels, mask


def unpacked() -> list[dict[str, torch.Tensor]]:
    rows = []
    for doc in documents():
        labels, mask = labelled(doc)
        pad = S - len(doc)
        rows.append(dict(tokens=torch.cat([doc, torch.zeros(pad, dtype=doc.dtype)]),
                         labels=torch.cat([labels, torch.zeros(pad, dtype=doc.dtype)]),
                         loss_mask=torch.cat([mask, torch.zeros(pad)]), position_ids=torch.arange(S)))
    return [{k: torch.stack([r[k] for r in rows[i:i + MBS]]) for k in rows[0]} for i in range(0, len(rows), MBS)]


def packed() -> list[dict[str, torch.Tensor]]:
    rows, current = [], []
    for doc in documents():  # greedy in order: a reference packer independent of launcher.data
        if sum(len(d) for d in current) + len(doc) > S:
            rows.append(current)
            current = []
        current.append(doc)
    rows.append(current)
    while len(rows) % MBS:
        rows.append([])
    built = []
    for row in rows:
        parts = [(d, *labelled(d)) for d in row]
        pad = S - sum(len(d) for d in row)
        parts.append((torch.zeros(pad, dtype=torch.long), torch.zeros(pad, dtype=torch.long), torch.zeros(pad)))
        lengths = [len(p[0]) for p in parts if len(p[0])]
        built.append(dict(tokens=torch.cat([p[0] for p in parts]), labels=torch.cat([p[1] for p in parts]),
                          loss_mask=torch.cat([p[2] for p in parts]),
                          position_ids=torch.cat([torch.arange(n) for n in lengths]), lengths=lengths))
    batches = []
    for i in range(0, len(built), MBS):
        group = built[i:i + MBS]
        lengths = [n for r in group for n in r["lengths"]]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        batch = {k: torch.stack([r[k] for r in group]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batches.append({**batch, "cu_seqlens": cu, "max_seqlen": max(lengths)})
    return batches


def main() -> None:
    tp, pp = int(sys.argv[1]), int(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout(world_size=world, tp=tp, pp=pp, dp=world // (tp * pp))
    assert layout.dp == 1, "this check feeds every rank the whole batch"
    args = ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/tiny.yaml"))
    optim = OptimConfig()
    init_distributed(layout, torch.device("cpu"), seed=5)
    result = {}
    for name, batches in (("unpacked", unpacked()), ("packed", packed())):
        engine = MegatronEngine(args, layout, optim, steps=2, seq_length=S, micro_batch_size=MBS, seed=5,
                                device=torch.device("cpu"), params_dtype=torch.float32, recompute=None,
                                backend="torch")
        steps = [engine.train_step(batches) for _ in range(2)]
        result[name] = {"loss": [r.loss for r in steps], "grad_norm": [r.grad_norm for r in steps],
                        "tokens": steps[0].num_tokens, "microbatches": len(batches)}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
