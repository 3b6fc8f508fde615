"""The HF packed-SFT peer of bench/bench_packed.py trains what ShardForge trains, and nothing crosses samples;
its padded form (a row per conversation, bench_lora's second peer) trains the same targets.

Reference: each conversation run alone (unpacked, its own forward), cross entropy taken on the
targets ShardForge's own row builder marks (launcher.data.packing.build_row's labels/loss_mask),
weighted by target count. The peer's one flattened batch (bench.hf_baseline.flatten_batch, i.e.
transformers.DataCollatorWithFlattening + SDPA with position_ids and no attention mask) must give
the same loss. fp32 on CPU, a tiny random LlamaForCausalLM.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import hf_baseline as hb
from launcher.data.indexed import IndexedDatasetWriter
from launcher.data.packing import build_row

SEQ, MBS, VOCAB = 32, 2, 96
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            kv_channels=None, vocab_size=VOCAB, max_position_embeddings=128, rotary_base=10000,
            rope_scaling=False, norm_epsilon=1e-5, tie_word_embeddings=False, add_qkv_bias=False,
            init_method_std=0.1)  # larger than usual: attention far from uniform


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """An SFT indexed dataset written with the project's writer: random ids, prompt/answer masks;
    lengths 3..45 so some conversations are cut to SEQ, and one has no target (dropped)."""
    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("sft") / "chat"
    with IndexedDatasetWriter(prefix, np.dtype(np.uint16), with_mask=True) as w:
        for i in range(40):
            n = int(rng.integers(3, 46))
            ids = rng.integers(4, VOCAB, n)
            mask = np.zeros(n, np.uint8)
            if i != 5:  # sample 5: a prompt only
                start = int(rng.integers(1, min(n, SEQ)))  # the answer starts before the cut
                mask[start:] = 1
                mask[rng.random(n) < 0.1] = 0  # a few holes (a multi-turn chat's later prompts)
                mask[start] = 1
            w.add(ids, mask)
        w.finalize()
    s = hb.sft_samples(prefix, SEQ)
    assert s.dropped == 1 and s.truncated > 0
    return s


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = hb.build_model(TINY, torch.device("cpu"), torch.float32, "eager")
    assert m.config._attn_implementation == "sdpa"
    return m


def _unpacked_reference(samples, model, indices: list[int]) -> tuple[float, int]:
    """Mean cross entropy over the conversations `indices`, each run alone, on the targets ShardForge's
    row builder marks; and the number of targets."""
    total, count = 0.0, 0
    for k in indices:
        row = build_row([samples.sample(k)], SEQ, pad_id=0)
        n = len(samples.sample(k)[0])
        logits = model(input_ids=torch.from_numpy(row["tokens"][None, :n])).logits[0]
        sel = torch.from_numpy(row["loss_mask"][:n] > 0)
        total += float(torch.nn.functional.cross_entropy(logits[sel], torch.from_numpy(row["labels"][:n])[sel],
                                                         reduction="sum"))
        count += int(sel.sum())
    return total / count, count


def test_steps_fill_the_budget_in_order(samples):
    plan = hb.packed_sft_steps(samples.lengths, MBS * SEQ, 30)
    flat = [k for step in plan for k in step]
    n = len(samples)
    assert flat == [k % n for k in range(len(flat))]  # in order, wrapping at the end
    assert len(flat) > n  # the test wraps
    for step, nxt in zip(plan, plan[1:]):
        used = sum(int(samples.lengths[k]) for k in step)
        assert used <= MBS * SEQ < used + int(samples.lengths[nxt[0]])


def test_labels_follow_shardforge_loss_mask(samples):
    idx = hb.packed_sft_steps(samples.lengths, MBS * SEQ, 1)[0]
    batch = hb.flatten_batch(samples, idx)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[0] == 1
    at = 0
    targets = 0
    for k in idx:
        ids, mask = samples.sample(k)
        row = build_row([(ids, mask)], SEQ, pad_id=0)  # ShardForge: label j = ids[j + 1], loss where mask[j + 1]
        n = len(ids)
        got = batch["labels"][0, at:at + n].numpy()
        assert got[0] == -100
        want = np.where(row["loss_mask"][:n - 1] > 0, row["labels"][:n - 1], -100)
        np.testing.assert_array_equal(got[1:], want)
        np.testing.assert_array_equal(batch["position_ids"][0, at:at + n].numpy(), np.arange(n))
        targets += int(row["loss_mask"].sum())
        at += n
    assert at == batch["input_ids"].shape[1]
    assert hb.loss_tokens(batch) == targets


def test_flattened_loss_equals_unpacked_reference(samples, model):
    idx = hb.packed_sft_steps(samples.lengths, MBS * SEQ, 1)[0]
    assert len(idx) >= 3
    batch = hb.flatten_batch(samples, idx)
    with torch.no_grad():
        packed = float(model(**batch).loss)
        reference, _ = _unpacked_reference(samples, model, idx)
        # The same flattened batch without position_ids is one long causal sequence: attention crosses
        # conversations and the loss moves, so the equality above is a real check of the isolation.
        crossing = float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    print(f"packed {packed:.7f} reference {reference:.7f} crossing {crossing:.7f}")
    assert packed == pytest.approx(reference, rel=1e-5)
    assert abs(crossing - reference) > 100 * 1e-5 * abs(reference)  # 100x the tolerance above


def test_isolation_check(samples, model):
    idx = hb.packed_sft_steps(samples.lengths, MBS * SEQ, 1)[0]
    out = hb.check_isolation(model, hb.flatten_batch(samples, idx), VOCAB)
    assert out["isolation_own_change"] > 0 and out["isolation_leak"] <= 1e-6 * out["isolation_own_change"]
    assert out["isolation_samples"] == len(idx)


def test_isolation_check_catches_a_crossing_mask(samples, model, monkeypatch):
    """A transformers that ignores the packed position_ids (as before masking_utils' packed detection)
    lets attention cross conversations: the check must fail the run."""
    import transformers.masking_utils as mu

    if not hasattr(mu, "find_packed_sequence_indices"):
        pytest.skip("this transformers has no packed-sequence detection to switch off")
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    idx = hb.packed_sft_steps(samples.lengths, MBS * SEQ, 1)[0]
    with pytest.raises(RuntimeError, match="not isolated"):
        hb.check_isolation(model, hb.flatten_batch(samples, idx), VOCAB)


def test_padded_steps_fit_the_budget_in_order(samples):
    plan = hb.padded_sft_steps(samples.lengths, MBS * SEQ, 30)
    flat = [k for step in plan for k in step]
    assert flat == [k % len(samples) for k in range(len(flat))]
    for step, nxt in zip(plan, plan[1:]):
        longest = max(int(samples.lengths[k]) for k in step)
        assert len(step) * longest <= MBS * SEQ
        assert (len(step) + 1) * max(longest, int(samples.lengths[nxt[0]])) > MBS * SEQ


def test_padded_loss_equals_unpacked_reference(samples, model):
    """Right padding without an attention mask: the causal mask keeps every real token from the
    padding after it, so the loss is each conversation's own (the same reference as the packed test)."""
    idx = hb.padded_sft_steps(samples.lengths, MBS * SEQ, 1)[0]
    assert len(idx) >= 2 and len({int(samples.lengths[k]) for k in idx}) > 1  # real padding
    batch = hb.padded_batch(samples, idx)
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape[0] == len(idx)
    with torch.no_grad():
        padded = float(model(**batch).loss)
        reference, count = _unpacked_reference(samples, model, idx)
    assert hb.loss_tokens(batch) == count
    assert padded == pytest.approx(reference, rel=1e-5)
