"""The preference objectives as megatron-core loss functions (one per micro batch of whole pairs).

The model returns per-token cross entropy [rows, seq] given labels (one packed stream [1, tokens]
for packed micro batches); a token's log-prob is its negative. Per sequence (one per row, or the
packed micro batch's `sequence_ids`: launcher/data/preference_batches.py) the target tokens'
log-probs are summed, sequences 2i and 2i + 1 taken as pair i's chosen and rejected sides, and
the loss of models/objectives.py applied.

Normalisation, the same in every layout and micro-batching: the step's loss is
    mean over the global batch's P pairs of the per-pair term
    + w · (minus the chosen sides' summed log-probs) / T
with w the objective's NLL weight (dpo/simpo.sft_weight, 1 for ORPO) and T the target tokens of
every chosen side in the global batch (under orpo_nll=sequence the NLL and T cover every token of
a chosen side that has a label in it: `sequence_mask`). A micro batch returns (total, pairs) with
    total = Σ its per-pair terms + w · its chosen NLL sum · P / T
and megatron-core's per-token loss mode (calculate_per_token_loss) divides the gradient by the
pairs summed over micro batches and DP ranks, P: Σ total / P is the loss above. P and T come with
the micro batch, so no extra collective is needed.

Under context parallelism each CP rank holds two chunks of every sequence: its sums are completed
with the other ranks' (added as constants, so each rank's backward covers its own tokens and the
gradient reduction over dp x cp adds them up), every rank computes the whole loss, and only CP
rank 0 counts the pairs and reports, so the global counts and sums are the unsplit batch's.

Step metrics (`PREFERENCE_METRICS`) are sums over the micro batch's pairs, reduced like the loss
and divided by P by the engine: rewards, reward accuracy and margin, and the log-probs the
objective reports (sums for DPO, per-token means for SimPO and ORPO), and the chosen NLL per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from models.objectives import PreferenceLoss, dpo_loss, orpo_loss, sequence_sums, simpo_loss, split_pairs

# metrics.jsonl names of the per-step preference metrics, in report order (after total and pairs)
PREFERENCE_METRICS = ("reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
                      "logps_rejected", "nll_loss")
_FROM_OBJECTIVES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected")
REPORT_KEY = "preference"


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective: `lm` (next-token cross entropy) or a preference loss and its settings."""
    name: str = "lm"            # lm | dpo | simpo | orpo
    beta: float = 0.1
    dpo_loss: str = "sigmoid"   # dpo: sigmoid | robust | hinge | ipo
    label_smoothing: float = 0.0
    sft_weight: float = 0.0     # dpo, simpo: weight of the chosen NLL
    gamma: float = 0.0          # simpo: target reward margin
    orpo_nll: str = "response"  # orpo: the chosen tokens its NLL covers (response | sequence)
    live_reference: bool = False  # dpo: reference log-probs from a frozen model held alongside (dpo.reference=live)

    @property
    def preference(self) -> bool:
        return self.name != "lm"


def row_ids(loss_mask: torch.Tensor) -> torch.Tensor:
    """Sequence id of every token of unpacked rows [rows, seq]: its row."""
    rows, seq = loss_mask.shape
    return torch.arange(rows, device=loss_mask.device)[:, None].expand(rows, seq)


def sequence_logps(output: torch.Tensor, batch: dict[str, torch.Tensor | int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed target log-probs, target tokens) per sequence of the micro batch, from the model's
    per-token losses: one sequence per row, or the packed rows' `sequence_ids` (2 per pair); whole
    sequences under context parallelism (module docstring)."""
    loss_mask = batch["loss_mask"]
    ids = batch.get("sequence_ids")
    if not torch.is_tensor(ids):
        sums, counts = sequence_sums(-output.float(), loss_mask, row_ids(loss_mask), loss_mask.shape[0])
    else:
        sums, counts = sequence_sums(-output.float(), loss_mask, ids.to(output.device), 2 * len(batch["pair_index"]))
    if _context_parallel_size() == 1:
        return sums, counts
    whole = torch.stack([sums.detach(), counts])
    dist.all_reduce(whole, group=ps.get_context_parallel_group())
    return sums + (whole[0] - sums.detach()), whole[1]


def _context_parallel_size() -> int:
    """The CP group's size; 1 outside megatron-core's process groups (the loss functions used in-process)."""
    return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def _reports() -> bool:
    """Whether this rank counts and reports its micro batches' pairs: CP rank 0 (every rank without CP)."""
    return _context_parallel_size() == 1 or ps.get_context_parallel_rank() == 0


def batch_loss(objective: ObjectiveConfig, sums: torch.Tensor, counts: torch.Tensor,
               reference: torch.Tensor | None,
               whole: tuple[torch.Tensor, torch.Tensor] | None = None) -> PreferenceLoss:
    """models/objectives.py's loss of the pairs whose per-row sums and target counts these are;
    `whole`: the sums and counts over every token of each sequence (ORPO's NLL with orpo_nll=sequence)."""
    chosen, rejected = split_pairs(sums)
    chosen_n, rejected_n = split_pairs(counts)
    if objective.name == "dpo":
        if reference is None:
            raise ValueError("train.objective=dpo: the micro batch carries no reference log-probs")
        ref_chosen, ref_rejected = split_pairs(reference.float())
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_n, rejected_n, beta=objective.beta,
                        loss=objective.dpo_loss, label_smoothing=objective.label_smoothing,
                        sft_weight=objective.sft_weight)
    if objective.name == "simpo":
        return simpo_loss(chosen, rejected, chosen_n, rejected_n, beta=objective.beta, gamma=objective.gamma,
                          label_smoothing=objective.label_smoothing, sft_weight=objective.sft_weight)
    if objective.name == "orpo":
        nll_logps, nll_tokens = (split_pairs(whole[0])[0], split_pairs(whole[1])[0]) if whole is not None else (None,
                                                                                                              None)
        return orpo_loss(chosen, rejected, chosen_n, rejected_n, beta=objective.beta, nll_logps=nll_logps,
                         nll_tokens=nll_tokens)
    raise ValueError(f"not a preference objective: {objective.name!r}")


def preference_loss_func(objective: ObjectiveConfig, batch: dict[str, torch.Tensor | int], output: torch.Tensor):
    """megatron-core loss function of one micro batch: (total, pairs, reports); normalisation above."""
    sums, counts = sequence_logps(output, batch)
    reference = batch.get("reference_logps")
    whole = None
    if objective.name == "orpo" and objective.orpo_nll == "sequence":  # every token with a label in its sequence
        whole = sequence_logps(output, {**batch, "loss_mask": batch["sequence_mask"]})
    result = batch_loss(objective, sums, counts, reference if torch.is_tensor(reference) else None, whole)
    # the global count of the tokens the NLL term covers
    tokens_key = "chosen_sequence_tokens_global" if whole is not None else "chosen_tokens_global"
    pairs_global, chosen_tokens_global = int(batch["pairs_global"]), int(batch[tokens_key])
    total = result.per_pair.sum()
    if result.sft_weight:
        total = total + result.sft_weight * result.nll_sum * (pairs_global / max(chosen_tokens_global, 1))
    pairs = torch.tensor(result.per_pair.numel() if _reports() else 0, dtype=torch.int, device=total.device)
    # scaled like total's NLL term: divided by P (engine) it is the global batch's NLL per chosen token
    nll_per_token = result.nll_sum.detach() * (pairs_global / max(chosen_tokens_global, 1))
    parts = [result.metrics[k].float().sum() for k in _FROM_OBJECTIVES] + [nll_per_token]
    report = {"lm loss": torch.stack([total.detach(), pairs.detach().float()]),
              REPORT_KEY: torch.stack([p.detach().float() for p in parts])}
    if not _reports():
        report = {k: torch.zeros_like(v) for k, v in report.items()}
    return total, pairs, report


def logps_loss_func(batch: dict[str, torch.Tensor | int], output: torch.Tensor):
    """Forward-only loss function that reports each row's summed target log-probs (the reference pass)."""
    sums, _ = sequence_logps(output, batch)
    zero = sums.sum() * 0
    return zero, torch.tensor(0, dtype=torch.int, device=zero.device), {"logps": sums.detach()}
