"""Training objectives over per-sequence log-probs: DPO (sigmoid, robust, hinge, ipo), SimPO and ORPO.

The model gives per-token log-probs of each target token; `sequence_sums` adds them up per
sequence (padded rows or packed rows, through their cu_seqlens) with the number of target
tokens, and the losses below take those sums, one entry per pair, chosen and rejected apart.
Nothing here knows about models, ranks or micro batches: the engines feed it and reduce its
terms (`PreferenceLoss`) over the global batch.

The formulas are TRL's (DPOTrainer, CPOTrainer with loss_type=simpo, ORPOTrainer), which the
unit tests call as the oracle. Notation: π policy sums, r reference sums, ̄· a per-token mean,
z the scaled margin, ε label smoothing, NLL the chosen responses' mean negative log-prob per
target token over the batch.
  dpo    z = β·((πc − rc) − (πr − rr)); rewards β·(π − r); logps: π
           sigmoid  −(1−ε)·logσ(z) − ε·logσ(−z)          ε > 0: conservative DPO
           robust   (−(1−ε)·logσ(z) + ε·logσ(−z)) / (1−2ε)
           hinge    relu(1 − z)
           ipo      (((πc − rc)/nc − (πr − rr)/nr) − 1/(2β))²   (per-token means: TRL's IPO)
         + sft_weight·NLL (RPO)
  simpo  z = β·(π̄c − π̄r) − γ;  −(1−ε)·logσ(z) − ε·logσ(−z) + sft_weight·NLL; rewards β·π̄; logps: π̄
  orpo   NLL − β·logσ(L(π̄c) − L(π̄r)), L(p) = p − log(1 − eᵖ) (log odds); rewards β·π̄; logps: π̄
ORPO's NLL covers the response tokens (the data's targets) by default; orpo.nll=sequence takes it
over prompt and response, as TRL's ORPOTrainer does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OBJECTIVES = ("lm", "dpo", "simpo", "orpo")  # train.objective; lm: next-token cross entropy (pretrain, SFT)
DPO_LOSSES = ("sigmoid", "robust", "hinge", "ipo")  # dpo.loss
SMOOTHED_LOSSES = ("sigmoid", "robust")  # the DPO losses that take label smoothing
DPO_REFERENCES = ("precomputed", "live")  # dpo.reference: where the reference log-probs come from
ORPO_NLL = ("response", "sequence")  # orpo.nll: the chosen tokens ORPO's NLL term covers


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Per-token segment index [total] from cumulative segment lengths over the flattened tokens
    (cu_seqlens[0] = 0); tokens from cu_seqlens[-1] on get -1 (ignored by `sequence_sums`)."""
    bounds = cu_seqlens.to(torch.long)
    ids = torch.full((total,), -1, dtype=torch.long, device=cu_seqlens.device)
    lengths = bounds[1:] - bounds[:-1]
    ids[:int(bounds[-1])] = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    return ids


def sequence_sums(token_logps: torch.Tensor, loss_mask: torch.Tensor, sequence_ids: torch.Tensor,
                  num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' log-probs, number of target tokens) per sequence, each [num_sequences].

    `token_logps`, `loss_mask` and `sequence_ids` have the same shape (padded [rows, S] with the row
    index as id, or packed rows with ids from `segment_ids`); a token counts where loss_mask is
    nonzero and its id is >= 0. Differentiable in token_logps; the sums do not depend on how the
    sequences were laid out in rows.
    """
    ids = sequence_ids.reshape(-1)
    keep = (loss_mask.reshape(-1) != 0) & (ids >= 0)
    values = token_logps.reshape(-1)[keep].float()
    sums = values.new_zeros(num_sequences).index_add(0, ids[keep], values)
    counts = torch.zeros(num_sequences, dtype=torch.float32, device=values.device).index_add(
        0, ids[keep], torch.ones_like(values, dtype=torch.float32))
    return sums, counts


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) of per-sequence values laid out as the preference datasets store pairs:
    sequence 2k is pair k's chosen side, 2k + 1 its rejected side."""
    pairs = values.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


@dataclass(frozen=True)
class PreferenceLoss:
    """A batch's preference loss and its parts. `loss` is the batch's loss as TRL reports it: the mean
    of `per_pair` plus `sft_weight`·`nll_sum`/`nll_tokens`. An engine that accumulates micro batches
    sums `per_pair` and the NLL terms and divides by the global pair and token counts instead."""
    loss: torch.Tensor
    per_pair: torch.Tensor  # [pairs] the preference term
    nll_sum: torch.Tensor  # minus the chosen sides' summed target log-probs (0-dim)
    nll_tokens: torch.Tensor  # the chosen sides' target tokens (0-dim)
    sft_weight: float
    # per-pair values (detached), logged as their batch means: rewards/chosen, rewards/rejected,
    # rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (+ ORPO's log-odds terms)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean_metrics(self) -> dict[str, float]:
        """The step metrics of this batch: `loss`, `nll_loss` and each metric's mean over the pairs."""
        out = {"loss": float(self.loss.detach()), "nll_loss": float((self.nll_sum / self.nll_tokens).detach())}
        out.update({k: float(v.float().mean()) for k, v in self.metrics.items()})
        return out


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                    rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z): the logistic loss of a preference label flipped with probability ε."""
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def _combine(per_pair: torch.Tensor, chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, sft_weight: float,
             metrics: dict[str, torch.Tensor], nll_weight: float | None = None) -> PreferenceLoss:
    nll_sum, nll_tokens = -chosen_logps.sum(), chosen_tokens.sum()
    weight = sft_weight if nll_weight is None else nll_weight
    loss = per_pair.mean()
    if weight:
        loss = loss + weight * nll_sum / nll_tokens
    return PreferenceLoss(loss=loss, per_pair=per_pair, nll_sum=nll_sum, nll_tokens=nll_tokens,
                          sft_weight=weight, metrics=metrics)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
             beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
             sft_weight: float = 0.0) -> PreferenceLoss:
    """DPO over per-sequence summed log-probs [pairs] of the policy and the frozen reference;
    `*_tokens` are the target-token counts (IPO's per-token means, the SFT term's denominator)."""
    if loss not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r} (expected one of {', '.join(DPO_LOSSES)})")
    if label_smoothing and loss not in SMOOTHED_LOSSES:
        raise ValueError(f"label smoothing applies to the {' and '.join(SMOOTHED_LOSSES)} losses, not {loss!r}")
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    z = beta * (chosen_ratio - rejected_ratio)
    if loss == "sigmoid":
        per_pair = _smoothed_sigmoid(z, label_smoothing)
    elif loss == "robust":
        per_pair = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) \
            / (1 - 2 * label_smoothing)
    elif loss == "hinge":
        per_pair = torch.relu(1 - z)
    else:  # ipo: IPO's τ is β; margins of per-token means keep it comparable across lengths
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        per_pair = (margin - 1 / (2 * beta)) ** 2
    metrics = _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy_chosen, policy_rejected)
    return _combine(per_pair, policy_chosen.float(), chosen_tokens, sft_weight, metrics)


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, *, beta: float, gamma: float, label_smoothing: float = 0.0,
               sft_weight: float = 0.0) -> PreferenceLoss:
    """SimPO (reference-free, length-normalised) over per-sequence summed log-probs [pairs]."""
    chosen_mean = policy_chosen.float() / chosen_tokens.clamp(min=1)
    rejected_mean = policy_rejected.float() / rejected_tokens.clamp(min=1)
    z = beta * (chosen_mean - rejected_mean) - gamma
    metrics = _reward_metrics(beta * chosen_mean, beta * rejected_mean, chosen_mean, rejected_mean)
    return _combine(_smoothed_sigmoid(z, label_smoothing), policy_chosen.float(), chosen_tokens, sft_weight, metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, from the branch that does not cancel (log1p for x below −log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, *, beta: float, nll_logps: torch.Tensor | None = None,
              nll_tokens: torch.Tensor | None = None) -> PreferenceLoss:
    """ORPO (reference-free: NLL of the chosen response plus β times the odds-ratio term) over
    per-sequence summed log-probs [pairs]; β is the paper's λ. `nll_logps`/`nll_tokens`: the chosen
    sides' summed log-probs and token counts the NLL covers instead of the response's (e.g. the whole
    sequence, as TRL's ORPOTrainer)."""
    chosen_mean = policy_chosen.float() / chosen_tokens.clamp(min=1)
    rejected_mean = policy_rejected.float() / rejected_tokens.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    metrics = _reward_metrics(beta * chosen_mean, beta * rejected_mean, chosen_mean, rejected_mean)
    metrics.update({"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})
    nll_logps = policy_chosen if nll_logps is None else nll_logps
    nll_tokens = chosen_tokens if nll_tokens is None else nll_tokens
    return _combine(-beta * ratio, nll_logps.float(), nll_tokens, 0.0, metrics, nll_weight=1.0)
