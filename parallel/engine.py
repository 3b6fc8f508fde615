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

    def sequence_logps(self, microbatches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """Forward only, in eval mode, weights untouched: each sequence's summed target log-probs
        (preference micro batches: parallel/preference_loss.py), micro batches in order, on the ranks
        that compute the loss (None elsewhere)."""
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
    """One optimizer step's loss sum (of the global batch, on every rank), loss tokens (pairs under a
    preference objective) and grad norm, and the objective's own metrics.

    On GPU they are still being computed when `train_step` returns: read on first use through a
    HostCopy, so the loop can queue the next step before it looks at this one's numbers."""

    def __init__(self, values: torch.Tensor, lr: float, moe: dict[str, float] | None = None,
                 metric_names: tuple[str, ...] = ()):
        # values: float64 [loss_sum, num_tokens, grad_norm, *metrics named by metric_names], on any device
        self.lr, self.moe, self.metric_names = lr, moe or {}, metric_names
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
    def metrics(self) -> dict[str, float]:
        """The objective's own step metrics (a preference objective's rewards and log-probs), by name."""
        return {name: self._get(3 + i) for i, name in enumerate(self.metric_names)}

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
        batch = {**batch, **{k: batch[k].reshape(1, -1) for k in PER_TOKEN_KEYS if k in batch}}
    return batch, packed


def packed_seq_params(batch: dict[str, Any]) -> PackedSeqParams:
    """THD parameters of a packed micro batch (document boundaries `cu_seqlens`)."""
    cu = batch["cu_seqlens"].to(torch.int32)
    max_len = int(batch["max_seqlen"]) if "max_seqlen" in batch else int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


# The per-token tensors of a micro batch, [rows, seq_length] each.
TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
# ... and those of a preference micro batch (parallel/preference_loss.py)
PER_TOKEN_KEYS = (*TOKEN_KEYS, "sequence_ids", "sequence_mask")


def context_parallel_split(batch: dict[str, Any],
                           packed: PackedSeqParams | None) -> tuple[dict[str, Any], PackedSeqParams | None]:
    """This context-parallel rank's share of a micro batch (from prepare_batch) and its THD parameters.

    Unpacked rows are cut into 2·cp chunks, CP rank r keeping chunks r and 2·cp−1−r (megatron's
    load-balanced split, which its RoPE slices the same way). A packed stream is split the same way
    per document (`packed_split`, TransformerEngine's THD convention, which megatron's THD RoPE
    follows), each document first padded at its end to a multiple of 2·cp tokens: padding tokens
    carry no loss and no real token attends them (they come after every real token of their
    document), so the loss and gradients are the unsplit stream's. The THD parameters then
    describe the padded stream. The whole batch when cp is 1."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch, packed
    if packed is None:
        split = get_batch_on_this_cp_rank({k: batch[k] for k in PER_TOKEN_KEYS if k in batch})
        return {**batch, **split}, None
    # (under tensor parallelism megatron runs sequence parallel: a rank's share splits over TP)
    index, cu_padded = packed_split(packed.cu_seqlens_q, cp, ps.get_context_parallel_rank(),
                                    share_multiple=ps.get_tensor_model_parallel_world_size())
    real, source = index >= 0, index.clamp(min=0)
    # (a packed preference batch's sequence ids and mask too: padding tokens get 0, and no loss)
    split = {k: torch.where(real, batch[k][:, source], torch.zeros((), dtype=batch[k].dtype, device=real.device))
             for k in PER_TOKEN_KEYS if k in batch}
    cu_padded = cu_padded.to(torch.int32)
    longest = int((cu_padded[1:] - cu_padded[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_padded, cu_seqlens_kv=cu_padded,
                             cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return {**batch, **split}, params


def packed_split(cu_seqlens: torch.Tensor, cp: int, rank: int,
                 share_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """CP rank `rank`'s tokens of a packed stream whose documents end at `cu_seqlens`:
    (index, padded boundaries). Each document is padded at its end to a multiple of 2·cp tokens
    and cut into 2·cp chunks of c_i tokens; the rank keeps chunks rank and 2·cp−1−rank of every
    document, in stream order. The last document is padded further where the rank's share must be
    a multiple of `share_multiple`. `index`: each kept token's position in the unpadded stream, -1
    for padding; the padded boundaries are the whole padded stream's (each document 2·cp·c_i long)."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    chunk = (lengths + 2 * cp - 1) // (2 * cp)
    share = 2 * int(chunk.sum())
    chunk[-1] += next(k for k in range(share_multiple) if (share + 2 * k) % share_multiple == 0)
    cu_padded = torch.nn.functional.pad((2 * cp * chunk).cumsum(0), (1, 0))
    kept = 2 * chunk  # tokens of each document on every rank
    total = int(kept.sum())
    docs = torch.repeat_interleave(torch.arange(kept.numel(), device=cu.device), kept, output_size=total)
    within = torch.arange(total, device=cu.device) - (kept.cumsum(0) - kept)[docs]
    c = chunk[docs]
    in_document = torch.where(within < c, rank * c + within, (2 * cp - 1 - rank) * c + within - c)
    index = torch.where(in_document < lengths[docs], cu[:-1][docs] + in_document, -1)
    return index, cu_padded
