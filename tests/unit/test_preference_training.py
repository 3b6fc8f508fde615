"""Preference training's pieces in-process: whole pairs per micro batch (launcher/data/preference_batches.py),
unpacked and packed, the micro-batch loss and its normalisation (parallel/preference_loss.py: every
micro-batching and DP split, and packed rows, give the whole unpacked batch's loss), the reference file
(launcher/data/reference_logps.py), and the config rules for the layouts that run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_tokenizers import train_sp

from launcher.data.indexed import IndexedDataset
from launcher.data.preference import ConcatenatedPairs, PreferencePairs
from launcher.data.preference_batches import PackedPreferenceBatches, PreferenceBatches
from launcher.data import reference_logps
from launcher.preprocess import Options, preprocess
from models.objectives import dpo_loss, orpo_loss, simpo_loss
from parallel.preference_loss import PREFERENCE_METRICS, REPORT_KEY, ObjectiveConfig, preference_loss_func

SEQ = 96
OBJECTIVES = [ObjectiveConfig("dpo", beta=0.3, sft_weight=0.5), ObjectiveConfig("dpo", beta=0.2, dpo_loss="ipo"),
              ObjectiveConfig("simpo", beta=2.0, gamma=0.5, sft_weight=0.25), ObjectiveConfig("orpo", beta=0.1)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pref")
    sp = train_sp(d)
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "add", "return", "12345"]
    lines = []
    for i in range(11):
        def text(n: int) -> str:
            return " ".join(rng.choice(words, n))
        lines.append({"prompt": f"Q{i}: {text(int(rng.integers(1, 6)))}? ", "chosen": text(int(rng.integers(1, 8))),
                      "rejected": text(int(rng.integers(1, 8)))})
    src = d / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines))
    options = Options(tokenizer=str(sp), format="preference", text_key="text", messages_key="messages",
                      chat_template="chatml", append_eod=True, add_bos=False)
    preprocess([src], d / "pairs", options)
    return d / "pairs"


def batches_of(prefix: Path, seed: int = 3) -> PreferenceBatches:
    return PreferenceBatches(PreferencePairs(IndexedDataset(str(prefix)), SEQ), SEQ, seed=seed, pad_id=0)


def test_micro_batches_hold_whole_pairs(dataset):
    b = batches_of(dataset)
    for step in range(4):  # crosses an epoch: 11 pairs, 4 a step
        order = [b.pair_at(step * 4 + j) for j in range(4)]
        [mb] = b.microbatches(step=step, dp_rank=0, dp_size=1, micro_batch_size=8, global_batch_size=8)
        assert mb["pair_index"].tolist() == order
        assert mb["pairs_global"] == 4
        assert mb["chosen_tokens_global"] == int(mb["loss_mask"][0::2].sum())
        for i, k in enumerate(order):
            pair = b.pairs.pair(k)
            for row, (ids, mask) in zip((2 * i, 2 * i + 1), ((pair.chosen_ids, pair.chosen_mask),
                                                            (pair.rejected_ids, pair.rejected_mask))):
                n = len(ids)
                assert mb["tokens"][row, :n].tolist() == ids.tolist()
                assert mb["labels"][row, :n - 1].tolist() == ids[1:].tolist()
                assert mb["loss_mask"][row, :n - 1].tolist() == mask[1:].astype(np.float32).tolist()
                assert not mb["loss_mask"][row, n - 1:].any()
    # every epoch reads each pair once
    assert len(b) == 11
    assert sorted(b.pair_at(i) for i in range(11)) == list(range(11))


def test_dp_ranks_and_micro_batches_split_the_same_global_batch(dataset):
    b = batches_of(dataset)
    [whole] = b.microbatches(step=1, dp_rank=0, dp_size=1, micro_batch_size=8, global_batch_size=8)
    parts = [mb for r in range(2) for mb in b.microbatches(step=1, dp_rank=r, dp_size=2, micro_batch_size=2,
                                                           global_batch_size=8)]
    assert len(parts) == 4
    for key in ("tokens", "labels", "loss_mask", "position_ids", "pair_index"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    assert {(p["pairs_global"], p["chosen_tokens_global"]) for p in parts} == {(4, whole["chosen_tokens_global"])}
    with pytest.raises(ValueError, match="even"):
        b.microbatches(step=0, dp_rank=0, dp_size=1, micro_batch_size=3, global_batch_size=6)


def test_reference_is_read_per_pair(dataset):
    b = batches_of(dataset)
    table = np.arange(22, dtype=np.float64).reshape(11, 2) * -1.5
    b.attach_reference(table)
    for mb in b.microbatches(step=2, dp_rank=1, dp_size=2, micro_batch_size=2, global_batch_size=8):
        assert mb["reference_logps"].tolist() == table[mb["pair_index"].numpy()].reshape(-1).tolist()
    with pytest.raises(ValueError, match="11 pairs"):
        b.attach_reference(table[:5])


PACKED_SEQ = 4 * SEQ  # rows that hold several pairs


def packed_batches_of(prefix: Path, seed: int = 3) -> PackedPreferenceBatches:
    return PackedPreferenceBatches(PreferencePairs(IndexedDataset(str(prefix)), PACKED_SEQ, packed=True), PACKED_SEQ,
                                   seed=seed, pad_id=0)


def test_packed_rows_hold_whole_pairs_chosen_then_rejected(dataset):
    b = packed_batches_of(dataset)
    rows = len(b.rows)
    assert rows < len(b) / 2  # several pairs a row
    table = -np.arange(2 * len(b), dtype=np.float64).reshape(-1, 2)
    b.attach_reference(table)
    seen = []
    for step in range(rows):  # one row a step: the first epoch
        [mb] = b.microbatches(step=step, dp_rank=0, dp_size=1, micro_batch_size=1, global_batch_size=1)
        order = mb["pair_index"].tolist()
        seen += order
        assert mb["pairs_global"] == len(order)
        at = 0
        for i, k in enumerate(order):
            pair = b.pairs.pair(k)
            for side, (ids, mask) in enumerate(((pair.chosen_ids, pair.chosen_mask),
                                                (pair.rejected_ids, pair.rejected_mask))):
                n = len(ids)
                assert mb["tokens"][0, at:at + n].tolist() == ids.tolist()
                assert mb["position_ids"][0, at:at + n].tolist() == list(range(n))
                assert mb["loss_mask"][0, at:at + n - 1].tolist() == mask[1:].astype(np.float32).tolist()
                assert mb["loss_mask"][0, at + n - 1] == 0  # no label crosses into the next sequence
                assert (mb["sequence_ids"][0, at:at + n] == 2 * i + side).all()
                assert at in mb["cu_seqlens"].tolist()
                at += n
        assert (mb["sequence_ids"][0, at:] == -1).all() and not mb["loss_mask"][0, at:].any()
        assert mb["chosen_tokens_global"] == int(sum(b.pairs.pair(k).chosen_mask[1:].sum() for k in order))
        assert mb["reference_logps"].tolist() == table[order].reshape(-1).tolist()
    assert sorted(seen) == list(range(len(b)))  # every epoch reads each pair once


def _fake_output(batch: dict, seed: int) -> torch.Tensor:
    """Per-token losses [rows, seq] as a model would return them (positive, where labels are)."""
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.rand(batch["tokens"].shape, generator=g, dtype=torch.float64)).float().requires_grad_()


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}-{o.dpo_loss}")
def test_micro_batch_losses_sum_to_the_global_batch_loss(dataset, objective):
    """Σ totals / Σ pairs over any split into micro batches and DP ranks (what megatron-core's per-token
    mode reduces) is models/objectives.py's loss of the whole global batch; so are the metrics."""
    b = batches_of(dataset)
    b.attach_reference(-np.linspace(20, 40, 22).reshape(11, 2))
    [whole] = b.microbatches(step=0, dp_rank=0, dp_size=1, micro_batch_size=8, global_batch_size=8)
    out = _fake_output(whole, 0)
    logps = -(out.detach() * whole["loss_mask"]).sum(1)
    counts = whole["loss_mask"].sum(1)
    c, r, nc, nr = logps[0::2], logps[1::2], counts[0::2], counts[1::2]
    if objective.name == "dpo":
        ref = whole["reference_logps"].float()
        expected = dpo_loss(c, r, ref[0::2], ref[1::2], nc, nr, beta=objective.beta, loss=objective.dpo_loss,
                            sft_weight=objective.sft_weight)
    elif objective.name == "simpo":
        expected = simpo_loss(c, r, nc, nr, beta=objective.beta, gamma=objective.gamma,
                              sft_weight=objective.sft_weight)
    else:
        expected = orpo_loss(c, r, nc, nr, beta=objective.beta)
    total = pairs = 0
    sums = torch.zeros(len(PREFERENCE_METRICS), dtype=torch.float64)
    for rank in range(2):
        for mb in b.microbatches(step=0, dp_rank=rank, dp_size=2, micro_batch_size=2, global_batch_size=8):
            rows = (mb["pair_index"][:, None] == whole["pair_index"][None]).float().argmax(1)
            rows = torch.stack([2 * rows, 2 * rows + 1], 1).reshape(-1)
            loss, n, report = preference_loss_func(objective, mb, out.detach()[rows])
            total, pairs = total + float(loss), pairs + int(n)
            sums += report[REPORT_KEY].double()
            assert report["lm loss"][0] == loss.detach() and report["lm loss"][1] == n
    assert pairs == 4
    assert total / pairs == pytest.approx(float(expected.loss), rel=1e-6)
    means = dict(zip(PREFERENCE_METRICS, (sums / pairs).tolist()))
    got = expected.mean_metrics()
    for ours, theirs in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                         ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected"),
                         ("nll_loss", "nll_loss")):
        assert means[ours] == pytest.approx(got[theirs], rel=1e-6, abs=1e-5), ours  # (fp32 sums of ~100 in differences)


def test_micro_batch_loss_gradient_is_the_global_loss_gradient(dataset):
    objective = OBJECTIVES[0]
    b = batches_of(dataset)
    b.attach_reference(-np.linspace(20, 40, 22).reshape(11, 2))
    [whole] = b.microbatches(step=0, dp_rank=0, dp_size=1, micro_batch_size=8, global_batch_size=8)
    out = _fake_output(whole, 1)
    loss, n, _ = preference_loss_func(objective, whole, out)
    (loss / n).backward()
    reference_grad = out.grad.clone()
    out.grad = None
    for i, mb in enumerate(b.microbatches(step=0, dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=8)):
        piece = out[2 * i:2 * i + 2]
        loss, _, _ = preference_loss_func(objective, mb, piece)
        (loss / 4).backward()  # megatron divides by the global pair count
    torch.testing.assert_close(out.grad, reference_grad, rtol=1e-6, atol=1e-9)


def test_reference_file_round_trip_and_fingerprint(dataset, tmp_path):
    whole = [(dataset, None)]
    path = reference_logps.reference_path(tmp_path / "run", whole, SEQ)
    assert path.parent == tmp_path / "run" / reference_logps.DIRECTORY and path.name.startswith("pairs-")
    # the row length and packing decide which pairs are usable: another length, another file
    assert reference_logps.reference_path(tmp_path / "run", whole, SEQ + 1) != path
    assert reference_logps.reference_path(tmp_path / "run", whole, SEQ, packed=True) != path  # so does packing
    # and the part of the pairs (data.split), and the datasets read together
    assert reference_logps.reference_path(tmp_path / "run", [(dataset, range(0, 8))], SEQ) != path
    both = reference_logps.reference_path(tmp_path / "run", [*whole, (dataset, range(0, 8))], SEQ)
    assert both != path and both.name.startswith("pairs+1-")
    assert reference_logps.reference_path(tmp_path / "run", whole, SEQ) == path
    table = np.random.default_rng(0).normal(size=(11, 2))
    reference_logps.save(path, table)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed
    np.testing.assert_array_equal(reference_logps.load(path, 11), table)
    with pytest.raises(ValueError, match=r"expected \(12, 2\)"):
        reference_logps.load(path, 12)
    with pytest.raises(ValueError, match="pairs, 2"):
        reference_logps.save(path, table.reshape(-1))


def test_a_resume_reads_the_reference_its_start_wrote(dataset, tmp_path):
    """A resumed run (no fresh start) neither computes nor rewrites the table: it reads it back."""
    from launcher import preference_reference

    b = batches_of(dataset)
    path = reference_logps.reference_path(tmp_path, [(dataset, None)], SEQ)
    table = -np.random.default_rng(1).uniform(10, 50, size=(len(b), 2))
    reference_logps.save(path, table)
    before = path.stat().st_mtime_ns
    preference_reference.attach(None, b, path, micro_batch_size=2, fresh_start=False)  # type: ignore[arg-type]
    np.testing.assert_array_equal(b.reference, table)
    assert path.stat().st_mtime_ns == before


@pytest.mark.parametrize("objective", [*OBJECTIVES, ObjectiveConfig("orpo", beta=0.1, orpo_nll="sequence")],
                         ids=lambda o: f"{o.name}-{o.dpo_loss}-{o.orpo_nll}")
def test_packed_micro_batches_give_the_unpacked_loss_and_gradient(dataset, objective):
    """The same pairs' per-token losses laid out in packed rows (2 micro batches of 2 rows, 2 DP ranks) and
    in one unpacked micro batch give the same loss, metrics and per-token gradient."""
    packed = packed_batches_of(dataset)
    reference = -np.linspace(20, 40, 2 * len(packed)).reshape(-1, 2)
    packed.attach_reference(reference)
    parts = [mb for rank in range(2) for mb in packed.microbatches(step=0, dp_rank=rank, dp_size=2,
                                                                  micro_batch_size=2, global_batch_size=4)]
    order = [k for mb in parts for k in mb["pair_index"].tolist()]
    unpacked = PreferenceBatches(PreferencePairs(IndexedDataset(str(dataset)), PACKED_SEQ), PACKED_SEQ, seed=3,
                                 pad_id=0)
    assert np.array_equal(unpacked.pairs.indices, packed.pairs.indices)  # the same usable pairs
    unpacked.attach_reference(reference)
    whole = unpacked.collate_pairs(order)
    whole["pairs_global"], whole["chosen_tokens_global"] = len(order), parts[0]["chosen_tokens_global"]
    whole["chosen_sequence_tokens_global"] = parts[0]["chosen_sequence_tokens_global"]
    assert whole["chosen_tokens_global"] == int(whole["loss_mask"][0::2].sum())
    # every chosen token but each side's last (whose label is outside it)
    assert whole["chosen_sequence_tokens_global"] == sum(len(unpacked.pairs.pair(k).chosen_ids) - 1 for k in order)
    assert whole["chosen_sequence_tokens_global"] == int(whole["sequence_mask"][0::2].sum())
    out = _fake_output(whole, 2)
    loss, n, report = preference_loss_func(objective, whole, out)
    (loss / n).backward()
    expected_grad, out.grad = out.grad.clone(), None
    total = pairs = 0
    sums = torch.zeros(len(PREFERENCE_METRICS), dtype=torch.float64)
    first = 0
    for mb in parts:
        # each packed token takes the unpacked token of the same sequence and position
        ids, positions = mb["sequence_ids"].reshape(-1), mb["position_ids"].reshape(-1)
        rows = torch.where(ids >= 0, first + ids, 0)
        packed_out = torch.where(ids >= 0, out[rows, positions], torch.zeros(()))
        first += 2 * len(mb["pair_index"])
        part, m, part_report = preference_loss_func(objective, mb, packed_out.reshape(1, -1))
        (part / len(order)).backward()
        total, pairs = total + float(part.detach()), pairs + int(m)
        sums += part_report[REPORT_KEY].double()
    assert pairs == len(order) and first == 2 * len(order)
    assert total / pairs == pytest.approx(float(loss / n), rel=1e-6)
    torch.testing.assert_close(sums / pairs, report[REPORT_KEY].double() / len(order), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_a_part_of_the_pairs(dataset):
    """data.split's parts: the usable pairs among documents [start, stop), the dropped ones counted there."""
    whole = PreferencePairs(IndexedDataset(str(dataset)), SEQ)
    part = PreferencePairs(IndexedDataset(str(dataset)), SEQ, documents=range(3, 9))
    assert part.indices.tolist() == [k for k in whole.indices.tolist() if 3 <= k < 9]
    assert part.dropped == 6 - len(part)


def test_several_datasets_are_read_one_after_the_other(dataset):
    """ConcatenatedPairs: pair k of the whole is the first part's pair k, then the second part's pairs."""
    first = PreferencePairs(IndexedDataset(str(dataset)), SEQ, documents=range(0, 5))
    second = PreferencePairs(IndexedDataset(str(dataset)), SEQ, documents=range(5, 11))
    both = ConcatenatedPairs([first, second])
    whole = PreferencePairs(IndexedDataset(str(dataset)), SEQ)
    assert len(both) == len(whole) and both.dropped == whole.dropped
    assert np.array_equal(both.chosen_targets(), whole.chosen_targets())
    for k in range(len(whole)):
        a, b = both.pair(k), whole.pair(k)
        assert np.array_equal(a.chosen_ids, b.chosen_ids) and np.array_equal(a.rejected_mask, b.rejected_mask)
    assert both.sources() == [(str(dataset), range(0, 5)), (str(dataset), range(5, 11))]
