"""DPO's precomputed reference: one forward pass over every usable pair with the run's initial weights.

At a fresh start the pass runs after the engine is built (and a model-only checkpoint loaded),
before the first step: DP rank r takes micro batches r, r + dp, ... of the pass's micro batches
(the pairs in dataset order, or the packed rows in packing order: launcher/data/preference_batches.py),
the last pipeline stage's TP and CP rank 0 of each replica puts its pairs' summed log-probs in place, a
sum over all ranks gives every rank the whole table, and rank 0 writes it
(launcher/data/reference_logps.py). A resumed run reads the table the run's start wrote: its
weights are no longer the initial ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from launcher.data import reference_logps
from launcher.data.preference_batches import PreferenceBatches
from parallel.engine import Engine


def compute(engine: Engine, batches: PreferenceBatches, micro_batch_size: int) -> np.ndarray:
    """Every usable pair's (chosen, rejected) summed response log-probs under the engine's weights,
    [pairs, 2] float64 on every rank (collective)."""
    table = torch.zeros(len(batches), 2, dtype=torch.float64, device=engine.device)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    reports = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
               and ps.get_context_parallel_rank() == 0)
    # the interleaved pipeline schedule (vpp) runs at least pp micro batches a pass
    group = engine.layout.pp if engine.layout.vpp else 1
    mine = list(range(batches.reference_count(micro_batch_size)))[dp_rank::dp_size]
    for at in range(0, len(mine), group):
        # the last micro batch is filled up to a full one, and the last group up to a whole group by
        # repeating its last micro batch; values of what fills are not kept
        loaded = [batches.reference_microbatch(i, micro_batch_size) for i in mine[at:at + group]]
        loaded += [(loaded[-1][0], 0)] * (group - len(loaded))
        try:
            logps = engine.sequence_logps([batch for batch, _ in loaded])
        except torch.OutOfMemoryError as err:  # where in the pass tells a growing allocation from one too large
            raise torch.OutOfMemoryError(f"DPO reference pass: out of memory at micro batch {at + 1} of {len(mine)} "
                                         f"of this rank: {err}") from err
        if reports and logps is not None:
            sizes = [2 * len(batch["pair_index"]) for batch, _ in loaded]
            for (batch, kept), values in zip(loaded, logps.split(sizes)):
                table[batch["pair_index"][:kept].to(table.device)] = values.to(table).reshape(-1, 2)[:kept]
    dist.all_reduce(table)
    return table.cpu().numpy()


def attach(engine: Engine, batches: PreferenceBatches, path: Path, *, micro_batch_size: int,
           fresh_start: bool) -> None:
    """Give `batches` the reference log-probs: computed and written to `path` at a fresh start, read
    from it on a resume (collective)."""
    if fresh_start:
        table = compute(engine, batches, micro_batch_size)
        if dist.get_rank() == 0:
            reference_logps.save(path, table)
            peak = (f" (peak GPU memory {torch.cuda.max_memory_allocated(engine.device) / 2**30:.1f} GiB)"
                    if engine.device.type == "cuda" else "")
            print(f"dpo: reference log-probs of {len(batches)} pairs -> {path}{peak}", flush=True)
        dist.barrier()
    else:
        table = reference_logps.load(path, len(batches))
    batches.attach_reference(table)
