"""The engine contract: what the launcher asks of a training engine, and what engines share.

`Engine` is the written protocol both engines implement (parallel/megatron_engine.py and
parallel/deepspeed_engine.py): one optimizer step over a rank's micro batches, the loss of a
batch without a step (evaluation), its parameter count, its full state written into / read from a directory, and its model weights whole for
export. Directories themselves (iter_* naming, `latest`, atomic rename, pruning) belong to
launcher/checkpoint.py, which hands the engine a directory it created.

Beside it: the step's result (`StepResult`, read from the device lazily through `HostCopy`)
and the preparation of a micro batch (device copy, packed-sequence parameters, the split over
context-parallel ranks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_batch_on_this_cp_rank

from models.args import ModelArgs


@runtime_checkable
class Engine(Protocol):
    """A training engine. Every method but num_parameters is collective: every rank calls it."""

    args: ModelArgs
    device: torch.device

    def train_step(self, microbatches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over this rank's micro batches of the global batch."""
        ...

    def eval_step(self, microbatches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Forward only, no gradients, weights untouched: (sum of token losses, loss tokens) over the
        global batch whose micro batches these are, on every rank. The loss is training's (the same
        token weighting), so sum / tokens is comparable across layouts, and the same weights and
        batches give the same numbers, bit for bit, every time."""
        ...

    def num_parameters(self) -> int:
        """Parameter elements held by this rank."""
        ...

    def save(self, directory: Path, step: int) -> None:
        """Write this engine's full state (model, optimizer, scheduler, RNG) after `step` optimizer
        steps into `directory`, an empty directory launcher/checkpoint.py created."""
        ...

    def load(self, directory: Path) -> int:
        """Load a checkpoint directory; returns the step to continue after (0 for a model-only
        checkpoint, whose weights start a fresh run)."""
        ...

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The model's weights whole, on every rank, under the checkpoint keys of a model-only
        checkpoint (layout-independent: `decoder.layers.*` stacked over layers) on the CPU."""
        ...


class HostCopy:
    """A tensor's value on the host without a stream sync: on GPU a pinned copy and an event, so
    `get` waits for the work queued before the copy only (`.item()` would wait for all of it)."""

    def __init__(self, value: torch.Tensor):
        self._ready: torch.cuda.Event | None = None
        if value.is_cuda:
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = value.detach().clone()

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


class StepResult:
    """One optimizer step's loss sum (of the global batch, on every rank), loss tokens and grad norm.

    On GPU they are still being computed when `train_step` returns: read on first use through a
    HostCopy, so the loop can queue the next step before it looks at this one's numbers."""

    def __init__(self, values: torch.Tensor, lr: float, moe: dict[str, float] | None = None):
        # values: float64 [loss_sum, num_tokens, grad_norm], on any device
        self.lr, self.moe = lr, moe or {}
        self._copy = HostCopy(values.to(torch.float64))
        self._values: list[float] | None = None

    def _get(self, i: int) -> float:
        if self._values is None:
            self._values = self._copy.get().tolist()
        return self._values[i]

    @property
    def loss_sum(self) -> float:
        return self._get(0)

    @property
    def num_tokens(self) -> int:
        return int(self._get(1))

    @property
    def grad_norm(self) -> float:
        return self._get(2)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.num_tokens, 1)

    def __repr__(self) -> str:
        return f"StepResult(loss={self.loss}, grad_norm={self.grad_norm}, lr={self.lr})"


def prepare_batch(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, Any], PackedSeqParams | None]:
    """A micro batch on `device`, and its PackedSeqParams when it is packed (else None)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    packed = packed_seq_params(batch) if "cu_seqlens" in batch else None
    if packed is not None:  # THD: the micro batch's rows become one stream of documents
        batch = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    return batch, packed


def packed_seq_params(batch: dict[str, Any]) -> PackedSeqParams:
    """THD parameters of a packed micro batch (document boundaries `cu_seqlens`)."""
    cu = batch["cu_seqlens"].to(torch.int32)
    max_len = int(batch["max_seqlen"]) if "max_seqlen" in batch else int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


# The per-token tensors of a micro batch, [rows, seq_length] each.
TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def context_parallel_split(batch: dict[str, Any]) -> dict[str, Any]:
    """This context-parallel rank's share of an unpacked micro batch: the rows cut into 2·cp chunks,
    CP rank r keeping chunks r and 2·cp−1−r (megatron's load-balanced split, which its RoPE
    slices the same way). The whole batch when cp is 1."""
    if ps.get_context_parallel_world_size() == 1:
        return batch
    if "cu_seqlens" in batch:
        raise NotImplementedError("context parallelism over packed (THD) micro batches")
    split = get_batch_on_this_cp_rank({k: batch[k] for k in TOKEN_KEYS if k in batch})
    return {**batch, **split}
