"""Under torchrun: build the model in a layout and save its freshly initialized weights
(model only, dist_checkpointing) so a test can compare full tensors across layouts.

    save_init OUT TP PP VPP [SEED [MODEL [EP]]]   write the initial weights of that layout to OUT
    save_init --compare REF OTHER    load both as full tensors; print the keys that differ
"""
from __future__ import annotations

import os
import sys

import torch
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf

from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def differing(ref: str, other: str) -> tuple[list[str], int, list[str]]:
    """Both saves loaded as full tensors: (weight keys, their number of values, keys that differ)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        a, b = dist_checkpointing.load_plain_tensors(ref), dist_checkpointing.load_plain_tensors(other)
    finally:  # the caller (a test, or tests/scripts/run_many.py) may go on in this process
        torch.distributed.destroy_process_group()
    weights = sorted(k for k in a if not k.endswith("_extra_state"))
    assert weights and weights == sorted(k for k in b if not k.endswith("_extra_state")), (sorted(a), sorted(b))
    return weights, sum(a[k].numel() for k in weights), [k for k in weights if not torch.equal(a[k], b[k])]


def compare(ref: str, other: str) -> None:
    weights, values, differ = differing(ref, other)
    print("keys: " + " ".join(weights))
    print(f"compared {len(weights)} tensors, {values} values; differ: {differ}")


def main() -> None:
    if sys.argv[1] == "--compare":
        return compare(sys.argv[2], sys.argv[3])
    out, tp, pp, vpp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) or None
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 7
    name = sys.argv[6] if len(sys.argv) > 6 else "tiny"
    ep = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout(world_size=world, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=world // (tp * pp))
    args = ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/{name}.yaml"))
    init_distributed(layout, torch.device("cpu"), seed=seed)
    engine = MegatronEngine(args, layout, OptimConfig(), steps=1, seq_length=32,
                            micro_batch_size=1, seed=seed, device=torch.device("cpu"), params_dtype=torch.float32,
                            recompute=None, backend="torch")
    model = {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(engine.chunks)}
    os.makedirs(out, exist_ok=True)
    dist_checkpointing.save(model, out)
    shutdown()


if __name__ == "__main__":
    main()
