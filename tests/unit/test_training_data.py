"""build_training_data: data.* choices → one micro-batch stream; packed and padded rows train the same targets."""
from __future__ import annotations

import json
from collections import Counter

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
