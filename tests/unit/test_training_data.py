"""build_training_data: data.* choices → one micro-batch stream; packed and padded rows train the same targets."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from tiny_tokenizers import SENTENCES, train_sp

from launcher.data.tokenizer import load_tokenizer
from launcher.data.training_data import build_training_data
from launcher.preprocess import Options, preprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tok = load_tokenizer(train_sp(d))
    convs = [[{"role": "user", "content": SENTENCES[i % 6]}, {"role": "assistant", "content": SENTENCES[(i * 5) % 6]
                                                              * (1 + i % 3)}] for i in range(40)]
    (d / "chat.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in convs))
    (d / "text.jsonl").write_text("\n".join(json.dumps({"text": s * (1 + i % 4)}) for i, s in enumerate(SENTENCES * 5)))
    base = dict(tokenizer=str(tok.path), text_key="text", messages_key="messages", chat_template="chatml",
                append_eod=True, add_bos=False)
    preprocess([d / "chat.jsonl"], d / "chat", Options(format="sft", **base))
    preprocess([d / "text.jsonl"], d / "text", Options(format="pretrain", **base))
    return tok, str(d / "chat"), str(d / "text")


def targets(batches):
    """Multiset of (document prefix, label) over loss-masked positions: what the loss sums over."""
    out = Counter()
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            tokens, pos = b["tokens"][r].tolist(), b["position_ids"][r].tolist()
            for j in torch.nonzero(b["loss_mask"][r]).flatten().tolist():
                out[(tuple(tokens[j - pos[j]:j + 1]), int(b["labels"][r, j]))] += 1
    return out


def test_packed_and_padded_sft_train_the_same_targets(data):
    tok, chat, _ = data
    seq = 512
    padded = build_training_data([chat], tok, seq_length=seq, seed=0, format="sft", packing=False)
    packed = build_training_data([chat], tok, seq_length=seq, seed=0, format="sft", packing=True)
    n_pad, n_pack = len(padded.dataset), len(packed.dataset)
    assert n_pack < n_pad == 40
    a = targets(padded.microbatches(step=0, dp_rank=0, dp_size=1, micro_batch_size=n_pad, global_batch_size=n_pad))
    b_batches = packed.microbatches(step=0, dp_rank=0, dp_size=1, micro_batch_size=n_pack, global_batch_size=n_pack)
    assert targets(b_batches) == a and sum(a.values()) > 0
    assert "cu_seqlens" in b_batches[0] and packed.stats[0].efficiency > padded.stats[0].efficiency


def test_pretrain_variants_and_blend(data):
    tok, chat, text = data
    windows = build_training_data([text], tok, seq_length=32, seed=0, reset_attention_mask=True, eod_mask_loss=True)
    b = windows.microbatches(step=0, dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=4)[0]
    assert b["tokens"].shape == (2, 32) and "cu_seqlens" in b
    assert not b["loss_mask"][b["tokens"] == tok.eos_id].any()
    blend = build_training_data([text, chat], tok, seq_length=64, seed=0, format="pretrain", packing=True,
                                weights=[1, 3])
    b = blend.microbatches(step=2, dp_rank=1, dp_size=2, micro_batch_size=2, global_batch_size=8)
    assert len(b) == 2 and b[0]["cu_seqlens"][-1] == 128


def test_configuration_errors(data, tmp_path):
    tok, chat, text = data
    with pytest.raises(ValueError, match="has no .mask.bin"):
        build_training_data([text], tok, seq_length=32, seed=0, format="sft")
    with pytest.raises(ValueError, match="2 weights for 1 datasets"):
        build_training_data([text], tok, seq_length=32, seed=0, weights=[1, 2])
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        build_training_data([str(tmp_path / "nope")], tok, seq_length=32, seed=0)
    class Smaller:  # a tokenizer with fewer ids than the data was made with
        path, vocab_size, eos_id, pad_id = "small.model", 100, 3, 0

    with pytest.raises(ValueError, match=r"outside tokenizer small.model's vocabulary of 100"):
        build_training_data([text], Smaller(), seq_length=32, seed=0)


class _PadZero:
    """A stand-in tokenizer: rows are padded with id 0, which no crafted document uses."""
    path, vocab_size, eos_id, pad_id = "pad_zero.model", 100, 99, 0


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Documents of very different lengths (short ones pack many to a row, long ones fill a row alone),
    token ids 1..98, with SFT masks; and a second dataset of mid-length documents to blend in."""
    from launcher.data.indexed import IndexedDatasetWriter

    d = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(7)
    for name, lengths in (("mixed", [3, 4, 5, 60, 62, 64, 6, 30, 2, 63] * 4), ("mid", [20, 25, 33, 41] * 5)):
        with IndexedDatasetWriter(d / name, np.uint16, with_mask=True) as writer:
            for n in lengths:
                writer.add(rng.integers(1, 99, n), np.ones(n, dtype=np.uint8))
            writer.finalize()
    return str(d / "mixed"), str(d / "mid")


def _batch_padding(batches, seq: int) -> tuple[float, float]:
    """(padding fraction, samples per row) of a step's micro batches, read off the rows themselves:
    real tokens are the non-zero ones; a packed row's documents are its cu_seqlens segments that hold
    a real token (the padding is its own segment); an unpacked row holds one document."""
    rows = real = samples = 0
    for b in batches:
        tokens = b["tokens"]
        rows += tokens.shape[0]
        real += int((tokens != 0).sum())
        if "cu_seqlens" in b:
            flat, cu = tokens.flatten(), b["cu_seqlens"].tolist()
            samples += sum(1 for a, z in zip(cu, cu[1:]) if (flat[a:z] != 0).any())
        else:
            samples += tokens.shape[0]
    return 1 - real / (rows * seq), samples / rows


@pytest.mark.parametrize("packing,blend", [(True, False), (False, False), (True, True)])
def test_step_stats_are_the_step_s_own_rows(uneven, packing, blend):
    """padding_fraction / samples_per_row in metrics.jsonl are those of each step's global batch
    (all DP ranks' rows), not one whole-dataset number repeated on every line."""
    mixed, mid = uneven
    seq, gbs, mbs, dp = 64, 4, 1, 2
    stream = build_training_data([mixed, mid] if blend else [mixed], _PadZero(), seq_length=seq, seed=3,
                                 format="sft", packing=packing, weights=[1, 1] if blend else None, blend_block=3)
    seen = []
    for step in range(8):
        batches = [b for rank in range(dp) for b in stream.microbatches(
            step=step, dp_rank=rank, dp_size=dp, micro_batch_size=mbs, global_batch_size=gbs)]
        padding, per_row = _batch_padding(batches, seq)
        stats = stream.step_stats(step=step, global_batch_size=gbs)
        assert stats["padding_fraction"] == pytest.approx(padding, abs=1e-12), step
        assert stats["samples_per_row"] == pytest.approx(per_row, abs=1e-12), step
        seen.append(stats["padding_fraction"])
    assert len(set(seen)) > 2, seen  # the steps differ: a whole-dataset value would not


def test_pretrain_windows_have_no_step_stats(data):
    tok, _, text = data
    windows = build_training_data([text], tok, seq_length=32, seed=0)
    assert windows.step_stats(step=0, global_batch_size=4) == {}
