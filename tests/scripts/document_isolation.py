"""Single process: in a packed row, changing one document's tokens leaves every other
document's logits unchanged, and a document placed after others gets the logits it gets alone
(positions restart per document). Prints OK."""
from __future__ import annotations

import os

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from omegaconf import OmegaConf

from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def logits(model, docs: list[torch.Tensor]) -> torch.Tensor:
    tokens = torch.cat(docs).unsqueeze(0)
    positions = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(len(d) for d in docs), max_seqlen_kv=max(len(d) for d in docs))
    with torch.no_grad():
        return model(tokens, positions, None, packed_seq_params=params)[0]  # [t, vocab]


def main() -> None:
    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=3)
    args = ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/tiny.yaml"))
    engine = MegatronEngine(args, Layout(world_size=1), OptimConfig(), steps=1,
                            seq_length=64, micro_batch_size=1, seed=3, device=torch.device("cpu"),
                            params_dtype=torch.float32, recompute=None, backend="torch")
    model = engine.chunks[0].module
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, 4096, (n,), generator=g) for n in (9, 17, 6, 20)]
    base = logits(model, docs)
    bounds = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).tolist()
    for k in range(len(docs)):
        changed = list(docs)
        changed[k] = torch.randint(5, 4096, (len(docs[k]),), generator=g)
        out = logits(model, changed)
        for j in range(len(docs)):
            a, b = base[bounds[j]:bounds[j + 1]], out[bounds[j]:bounds[j + 1]]
            if j == k:
                assert not torch.allclose(a, b), "perturbing a document must change its own logits"
            else:
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"document {j} changed when {k} did")
    for k, doc in enumerate(docs):  # alone, at offset 0, through the same packed path and through dense SDPA
        alone = logits(model, [doc])
        torch.testing.assert_close(base[bounds[k]:bounds[k + 1]], alone, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            dense = model(doc.unsqueeze(0), torch.arange(len(doc)).unsqueeze(0), None)[0]
        torch.testing.assert_close(alone, dense, rtol=1e-5, atol=1e-5)
    print("ISOLATION OK", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
