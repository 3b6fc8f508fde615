"""Preference objectives (models/objectives.py) against TRL's own trainers, and packed == padded.

The oracle is TRL's code, called without a model: DPOTrainer._compute_loss with a stand-in model
that returns the per-token log-probs (TRL sums them itself), CPOTrainer.get_batch_loss_metrics
(loss_type=simpo) and ORPOTrainer.get_batch_loss_metrics with a stand-in model that returns
logits (TRL's own concatenated_forward and get_batch_logps turn them into sequence log-probs).
Both sides differentiate the same leaf logits, so the gradients are compared too. ShardForge's
side goes the way an engine will: per-token log-probs laid out in rows by the project's packer
(launcher/data/packing.py), summed per sequence through cu_seqlens.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from launcher.data.packing import build_row, pack
from models.objectives import dpo_loss, orpo_loss, segment_ids, sequence_sums, simpo_loss, split_pairs

pytest.importorskip("trl")
from trl_oracle import (Batch, StubAccelerator, logits_model, side_batch, trl_cpo, trl_dpo_loss,  # noqa: E402
                        trl_orpo, trl_orpo_loss, trl_simpo_loss, trl_stub, trl_token_logps)

VOCAB, ROW = 11, 40
RTOL = 1e-5  # relative, fp32
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
worst: dict[str, float] = defaultdict(float)  # largest relative difference seen per quantity (printed at the end)


def make_batch(seed: int, pairs: int = 5, prompt_lengths: tuple[int, int] = (1, 7)) -> Batch:
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(pairs):
        prompt = rng.integers(0, VOCAB, int(rng.integers(*prompt_lengths)))
        for _side in range(2):
            response = rng.integers(0, VOCAB, int(rng.integers(1, 12)))
            ids.append(np.concatenate([prompt, response]))
            masks.append(np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(response), np.uint8)]))
    gen = torch.Generator().manual_seed(seed)
    width = max(len(x) for x in ids)
    logits = (2 * torch.randn(2 * pairs, width, VOCAB, generator=gen)).requires_grad_()
    reference = -20 * torch.rand(2 * pairs, generator=gen)
    return Batch(ids, masks, logits, reference)


def shardforge_sums(batch: Batch, algorithm: str = "bfd") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (summed target log-probs, target tokens) [2B], dataset order, from per-token
    log-probs laid out in rows of ROW tokens by the project's packer (algorithm none: one per row)."""
    lengths = np.array([len(x) for x in batch.ids])
    rows = pack(lengths, ROW, algorithm)
    values = torch.zeros(len(rows) * ROW)
    loss_mask, bounds, owner = [], [0], []
    for r, members in enumerate(rows):
        row = build_row([(batch.ids[q], batch.masks[q]) for q in members], ROW, pad_id=0)
        loss_mask.append(torch.from_numpy(row["loss_mask"]))
        bounds += [r * ROW + int(b) for b in row["cu_seqlens"][1:]]
        owner += members + [-1] * (len(row["cu_seqlens"]) - 1 - len(members))  # the padding segment: no sequence
        at = r * ROW
        for q in members:
            n = len(batch.ids[q])
            labels = torch.from_numpy(batch.ids[q][1:].astype(np.int64))
            # label j of a document is its token j + 1, predicted from position j
            token_logps = torch.log_softmax(batch.logits[batch.row_of(q), :n - 1], -1).gather(-1, labels[:, None])[:, 0]
            values = values.index_copy(0, torch.arange(at, at + n - 1), token_logps)
            at += n
    # segment -> sequence; the appended -1 also maps segment_ids' -1 (tokens past the last bound) to none
    sequence_ids = torch.tensor(owner + [-1])[segment_ids(torch.tensor(bounds), len(rows) * ROW)]
    return sequence_sums(values, torch.cat(loss_mask), sequence_ids, len(batch.ids))


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def check_against(name: str, ours, our_loss: torch.Tensor, trl_loss: torch.Tensor, trl_metrics: dict[str, float],
                  batch: Batch, metric_names: tuple[str, ...] = METRICS) -> None:
    """Loss, metrics and d loss / d logits of ours against TRL's, within RTOL relative."""
    (ours_grad,) = torch.autograd.grad(our_loss, batch.logits)
    (trl_grad,) = torch.autograd.grad(trl_loss, batch.logits)
    diffs = {"loss": rel(our_loss.detach(), trl_loss.detach()), "grad": rel(ours_grad, trl_grad)}
    mine = ours.mean_metrics()
    for k in metric_names:
        diffs[k] = abs(mine[k] - trl_metrics[k]) / max(abs(trl_metrics[k]), 1e-12)
    for k, v in diffs.items():
        worst[f"{name} {k}"] = max(worst[f"{name} {k}"], v)
    assert max(diffs.values()) <= RTOL, diffs
    assert float(trl_grad.abs().max()) > 0


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nmax relative difference vs TRL:", ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))


DPO_CASES = [
    # loss, label_smoothing, sft_weight, TRL loss_type list and weights
    ("sigmoid", 0.0, 0.0, ["sigmoid"], [1.0]),
    ("robust", 0.2, 0.0, ["robust"], [1.0]),
    ("hinge", 0.0, 0.0, ["hinge"], [1.0]),
    ("ipo", 0.0, 0.0, ["ipo"], [1.0]),
    ("sigmoid", 0.0, 0.5, ["sigmoid", "sft"], [1.0, 0.5]),  # RPO: the chosen NLL weighted in
]


@pytest.mark.parametrize("loss,smoothing,sft_weight,loss_types,weights", DPO_CASES,
                         ids=[f"{c[0]}-ls{c[1]}-sft{c[2]}" for c in DPO_CASES])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(loss, smoothing, sft_weight, loss_types, weights, beta):
    batch = make_batch(seed=int(beta * 10))
    sums, counts = shardforge_sums(batch)
    ours = dpo_loss(*split_pairs(sums), *split_pairs(batch.reference), *split_pairs(counts), beta=beta, loss=loss,
                    label_smoothing=smoothing, sft_weight=sft_weight)
    trl_loss, trl_metrics = trl_dpo_loss(batch, beta=beta, loss_types=loss_types, loss_weights=weights,
                                         label_smoothing=smoothing)
    check_against(f"dpo-{loss}{'+sft' if sft_weight else ''}", ours, ours.loss, trl_loss, trl_metrics, batch)


def test_conservative_dpo_matches_trl_cpo_sigmoid():
    """DPOTrainer's sigmoid takes no label smoothing; TRL's label-smoothed (conservative) sigmoid is
    CPOTrainer.cpo_loss, whose margin is its inputs' difference: given the DPO log-ratios it is cDPO."""
    beta, smoothing = 0.3, 0.15
    batch = make_batch(seed=7)
    sums, counts = shardforge_sums(batch)
    ours = dpo_loss(*split_pairs(sums), *split_pairs(batch.reference), *split_pairs(counts), beta=beta,
                    loss="sigmoid", label_smoothing=smoothing)
    sequence_logps = trl_token_logps(batch).sum(1)  # DPOTrainer's own per-sequence sum (TRL's order)
    ratios = sequence_logps - torch.cat(split_pairs(batch.reference))
    stub = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=smoothing,
                           accelerator=StubAccelerator())
    trl_losses, _, _ = trl_cpo.CPOTrainer.cpo_loss(stub, *ratios.chunk(2))
    _, trl_metrics = trl_dpo_loss(batch, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0])
    check_against("dpo-sigmoid-ls", ours, ours.loss, trl_losses.mean(), trl_metrics, batch)


@pytest.mark.parametrize("smoothing,sft_weight", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.7)])
def test_simpo_matches_trl_cpo(smoothing, sft_weight):
    beta, gamma = 2.0, 1.0
    batch = make_batch(seed=11)
    sums, counts = shardforge_sums(batch)
    ours = simpo_loss(*split_pairs(sums), *split_pairs(counts), beta=beta, gamma=gamma, label_smoothing=smoothing,
                      sft_weight=sft_weight)
    trl_loss, trl_metrics = trl_simpo_loss(batch, beta=beta, gamma=gamma, label_smoothing=smoothing,
                                           sft_weight=sft_weight)
    names = METRICS + (("nll_loss",) if sft_weight else ())
    check_against(f"simpo{'-ls' if smoothing else ''}{'+sft' if sft_weight else ''}", ours, ours.loss, trl_loss,
                  trl_metrics, batch, names)


def test_orpo_matches_trl():
    """A one-token prompt: TRL's ORPO NLL (over prompt and response, the first token never predicted)
    then covers exactly the response tokens, which are ShardForge's targets: the whole loss matches."""
    batch = make_batch(seed=13, prompt_lengths=(1, 2))
    sums, counts = shardforge_sums(batch)
    ours = orpo_loss(*split_pairs(sums), *split_pairs(counts), beta=0.1)
    trl_loss, trl_metrics = trl_orpo_loss(batch, beta=0.1)
    check_against("orpo", ours, ours.loss, trl_loss, trl_metrics, batch,
                  METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"))


def test_orpo_odds_ratio_term_matches_trl_with_longer_prompts():
    """Longer prompts: TRL's NLL also covers the prompt, ShardForge's only the response; the
    odds-ratio term (loss minus NLL), its gradient and the metrics still match."""
    batch = make_batch(seed=17)
    sums, counts = shardforge_sums(batch)
    ours = orpo_loss(*split_pairs(sums), *split_pairs(counts), beta=0.25)
    trl_loss, trl_metrics = trl_orpo_loss(batch, beta=0.25)
    # TRL returns its NLL as a number only: rebuild its graph-free part by subtracting it
    (trl_nll_grad,) = torch.autograd.grad(_trl_orpo_nll(batch), batch.logits, retain_graph=True)
    (ours_nll_grad,) = torch.autograd.grad(ours.nll_sum / ours.nll_tokens, batch.logits, retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, batch.logits, retain_graph=True)
    (ours_grad,) = torch.autograd.grad(ours.loss, batch.logits, retain_graph=True)
    term = ours.loss - ours.nll_sum / ours.nll_tokens
    assert rel(term.detach(), trl_loss.detach() - trl_metrics["nll_loss"]) <= RTOL
    assert rel(ours_grad - ours_nll_grad, trl_grad - trl_nll_grad) <= RTOL
    mine = ours.mean_metrics()
    for k in METRICS + ("log_odds_ratio", "log_odds_chosen"):
        assert abs(mine[k] - trl_metrics[k]) <= RTOL * max(abs(trl_metrics[k]), 1e-12), k


def _trl_orpo_nll(batch: Batch) -> torch.Tensor:
    """TRL ORPO's NLL graph: its concatenated_forward on the chosen sides (the fifth output)."""
    cls = trl_orpo.ORPOTrainer
    stub = trl_stub(cls, beta=0.1)
    return cls.concatenated_forward(stub, logits_model(batch), side_batch(batch))[4]


def test_packed_rows_equal_padded_rows():
    """The same pairs one sequence per row and packed several to a row (pairs split across rows):
    sequence sums, DPO loss and its gradient agree within 1e-6."""
    batch = make_batch(seed=19, pairs=8)
    (packed, packed_counts), (padded, padded_counts) = shardforge_sums(batch, "bfd"), shardforge_sums(batch, "none")
    assert len(pack(np.array([len(x) for x in batch.ids]), ROW, "bfd")) < len(batch.ids)  # really packed
    assert torch.equal(packed_counts, padded_counts)
    assert rel(packed.detach(), padded.detach()) <= 1e-6
    losses = [dpo_loss(*split_pairs(s), *split_pairs(batch.reference), *split_pairs(packed_counts), beta=0.1,
                       sft_weight=0.3).loss for s in (packed, padded)]
    grads = [torch.autograd.grad(x, batch.logits, retain_graph=True)[0] for x in losses]
    assert rel(losses[0].detach(), losses[1].detach()) <= 1e-6
    assert rel(grads[0], grads[1]) <= 1e-6


def test_sequence_sums_of_padded_rows_and_ignored_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, -7.0, -8.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.tensor([[0, 0, 0, 0], [1, 1, -1, -1]])
    sums, counts = sequence_sums(logps, mask, ids, 2)
    assert sums.tolist() == [-5.0, -11.0] and counts.tolist() == [2.0, 2.0]
    sums.sum().backward()
    assert logps.grad.tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    assert segment_ids(torch.tensor([0, 2, 5]), 6).tolist() == [0, 0, 1, 1, 1, -1]
