"""TRL's preference losses called as oracles without a model (TRL is installed in tests only).

`Batch` holds pairs in the dataset layout (sequence 2k chosen, 2k + 1 rejected) with leaf logits in
TRL's order; the trl_* functions run DPOTrainer._compute_loss (precomputed reference log-probs),
CPOTrainer.get_batch_loss_metrics (loss_type=simpo) and ORPOTrainer.get_batch_loss_metrics on them
through stand-ins for the trainer and the model.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.objectives import split_pairs

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")


@dataclass
class Batch:
    """Pairs of (prompt + response) token ids with response masks, and leaf logits [2B, L, V] in TRL's
    order (chosen of pairs 0..B-1, then their rejected sides)."""
    ids: list[np.ndarray]  # dataset order: sequence 2k chosen, 2k + 1 rejected
    masks: list[np.ndarray]
    logits: torch.Tensor
    reference: torch.Tensor  # [2B] a reference model's summed log-probs, dataset order

    @property
    def pairs(self) -> int:
        return len(self.ids) // 2

    def row_of(self, q: int) -> int:
        return q // 2 if q % 2 == 0 else self.pairs + q // 2

    def trl_tensors(self, side: int | None = None) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / completion_mask, right-padded, in TRL's order (side 0/1: one side)."""
        qs = [q for q in [*range(0, 2 * self.pairs, 2), *range(1, 2 * self.pairs, 2)] if side is None or q % 2 == side]
        width = self.logits.shape[1]
        out = {k: torch.zeros(len(qs), width, dtype=torch.long) for k in ("input_ids", "attention_mask",
                                                                           "completion_mask")}
        for i, q in enumerate(qs):
            n = len(self.ids[q])
            out["input_ids"][i, :n] = torch.from_numpy(self.ids[q])
            out["attention_mask"][i, :n] = 1
            out["completion_mask"][i, :n] = torch.from_numpy(self.masks[q].astype(np.int64))
        return out


def trl_token_logps(batch: Batch) -> torch.Tensor:
    """What TRL's fused LM head returns: log-prob of token j + 1 at j, zero outside the completion."""
    t = batch.trl_tensors()
    logps = torch.log_softmax(batch.logits[:, :-1], -1).gather(-1, t["input_ids"][:, 1:, None])[..., 0]
    return logps.masked_fill(t["completion_mask"][:, 1:] == 0, 0.0)


class StubAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def trl_dpo_loss(batch: Batch, *, beta: float, loss_types: list[str], loss_weights: list[float],
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's DPOTrainer._compute_loss on this batch (precomputed reference log-probs)."""
    t = batch.trl_tensors()
    log_probs = trl_token_logps(batch)
    zeros = torch.zeros_like(log_probs)
    outputs = SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=StubAccelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", beta=beta, loss_types=loss_types,
        loss_weights=loss_weights, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    chosen_ref, rejected_ref = split_pairs(batch.reference)
    inputs = {**t, "ref_chosen_logps": chosen_ref, "ref_rejected_logps": rejected_ref}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def side_batch(batch: Batch) -> dict[str, torch.Tensor]:
    """chosen_*/rejected_* input ids, attention masks and labels (-100 outside the response), as the
    CPO/ORPO collators give them."""
    out = {}
    for side, name in enumerate(("chosen", "rejected")):
        t = batch.trl_tensors(side)
        out[f"{name}_input_ids"] = t["input_ids"]
        out[f"{name}_attention_mask"] = t["attention_mask"]
        out[f"{name}_labels"] = t["input_ids"].masked_fill(t["completion_mask"] == 0, -100)
    return out


def trl_stub(cls: type, **attrs) -> SimpleNamespace:
    stub = SimpleNamespace(accelerator=StubAccelerator(), is_encoder_decoder=False, pad_token_id=0, padding_value=0,
                           aux_loss_enabled=False,
                           concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps, **attrs)
    stub.concatenated_forward = lambda model, batch: cls.concatenated_forward(stub, model, batch)
    return stub


def logits_model(batch: Batch):
    return lambda input_ids, attention_mask=None, use_cache=False, **kw: SimpleNamespace(logits=batch.logits)


def trl_simpo_loss(batch: Batch, *, beta: float, gamma: float, label_smoothing: float,
                   sft_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's CPOTrainer.get_batch_loss_metrics with loss_type=simpo (cpo_alpha: the NLL weight)."""
    cls = trl_cpo.CPOTrainer
    stub = trl_stub(cls, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                     cpo_alpha=sft_weight, alpha=0.0)
    stub.cpo_loss = lambda c, r: cls.cpo_loss(stub, c, r)
    return cls.get_batch_loss_metrics(stub, logits_model(batch), side_batch(batch))


def trl_orpo_loss(batch: Batch, *, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's ORPOTrainer.get_batch_loss_metrics."""
    cls = trl_orpo.ORPOTrainer
    stub = trl_stub(cls, beta=beta)
    stub.odds_ratio_loss = lambda c, r: cls.odds_ratio_loss(stub, c, r)
    loss, metrics = cls.get_batch_loss_metrics(stub, logits_model(batch), side_batch(batch))
    return loss, {k: float(v) for k, v in metrics.items()}
