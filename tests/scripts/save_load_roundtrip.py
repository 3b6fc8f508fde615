"""Under torchrun: train an engine a few steps, save, load into a fresh engine built from a
different seed, and check every parameter, the exported whole weights (against the files) and
the next optimizer step match. Prints OK."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launcher import checkpoint
from models.args import ModelArgs
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown
from megatron.core import parallel_state as ps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def batches(step: int, dp_rank: int, dp: int) -> list[dict[str, torch.Tensor]]:
    data = torch.randint(0, 4096, (8, 33), generator=torch.Generator().manual_seed(step))
    mine = data[dp_rank * 8 // dp:(dp_rank + 1) * 8 // dp]
    return [dict(tokens=mine[i:i + 2, :-1], labels=mine[i:i + 2, 1:], loss_mask=torch.ones(2, 32),
                 position_ids=torch.arange(32).expand(2, 32)) for i in range(0, len(mine), 2)]


def _model_tensors_on_disk(directory) -> dict[str, torch.Tensor]:
    """Every model tensor of a dist checkpoint, whole (the optimizer's keys left out)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(str(directory))
    request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(tuple(m.global_shape), dtype=m.dtype),
                                                    replica_id=dist.get_rank())
               for key, m in meta.items() if not key.startswith("optimizer.")}
    loaded = dist_checkpointing.load(request, str(directory))
    return {key: loaded[key] for key in request}  # (load also returns the common state)


def main() -> None:
    ckpt_dir, tp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout(world_size=world, tp=tp, pp=pp, dp=world // (tp * pp))
    args = ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/tiny.yaml"))
    optim = OptimConfig()
    init_distributed(layout, torch.device("cpu"), seed=1)

    def engine(seed: int) -> MegatronEngine:
        return MegatronEngine(args, layout, optim, steps=10, seq_length=32, micro_batch_size=2, seed=seed,
                              device=torch.device("cpu"), params_dtype=torch.float32, recompute=None,
                              backend="torch")

    dp_rank = ps.get_data_parallel_rank()
    trained = engine(seed=1)
    for step in range(3):
        trained.train_step(batches(step, dp_rank, layout.dp))
    checkpoint.save(trained, ckpt_dir, step=3)

    fresh = engine(seed=2)
    before = [torch.equal(a, b) for a, b in zip(trained.chunks[0].parameters(), fresh.chunks[0].parameters())]
    assert not any(before), "different seeds must give different weights (else the test proves nothing)"
    step = checkpoint.load(fresh, ckpt_dir)
    assert step == 3, step
    for (name, a), b in zip(trained.chunks[0].named_parameters(), fresh.chunks[0].parameters()):
        assert torch.equal(a, b), f"parameter {name} differs after load"
    # export_weights gathers each tensor whole, as dist_checkpointing reads it back from the files.
    exported = fresh.export_weights()
    on_disk = _model_tensors_on_disk(checkpoint.resolve(ckpt_dir))
    assert sorted(exported) == sorted(on_disk), sorted(set(exported) ^ set(on_disk))
    for key, tensor in on_disk.items():
        assert torch.equal(exported[key], tensor), f"exported {key} differs from the checkpoint's"
    # Optimizer moments and the LR schedule came back too: one more identical step stays identical.
    r1 = trained.train_step(batches(3, dp_rank, layout.dp))
    r2 = fresh.train_step(batches(3, dp_rank, layout.dp))
    assert (r1.loss, r1.grad_norm, r1.lr) == (r2.loss, r2.grad_norm, r2.lr), (r1, r2)
    for (name, a), b in zip(trained.chunks[0].named_parameters(), fresh.chunks[0].parameters()):
        assert torch.equal(a, b), f"parameter {name} differs one step after load"
    dist.barrier()
    if dist.get_rank() == 0:
        print("ROUNDTRIP OK", flush=True)
    shutdown()


if __name__ == "__main__":  # dist_checkpointing's writer spawns a process: the guard is required
    main()
