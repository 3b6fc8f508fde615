"""SFT: chat rendering, assistant-only loss mask, truncation policy, preprocess format=sft."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_tokenizers import IM_END, IM_START, train_hf, train_sp

from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter
from launcher.data.sft import SampleError, SFTSamples, check_messages, encode_conversation
from launcher.data.tokenizer import load_tokenizer
from launcher.preprocess import DataError, Options, preprocess

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does add(a, b) return?"},
    {"role": "assistant", "content": "It returns a + b."},
    {"role": "user", "content": "And for 12345 and 678?"},
    {"role": "assistant", "content": "The quick answer: 13023."},
]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return load_tokenizer(train_sp(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return train_hf(tmp_path_factory.mktemp("hf") / "tok")


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def test_chatml_mask_is_exactly_each_assistant_turn(sp_tok):
    ids, mask = encode_conversation(sp_tok, CONVERSATION)
    # Independent rendering: the ChatML text written out by hand, tokenized as a whole.
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in CONVERSATION)
    assert ids.tolist() == sp_tok.encode(text)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    spans = runs(mask)
    assert len(spans) == len(assistant)
    end_id = sp_tok.encode(IM_END)[-1]
    for (a, b), content in zip(spans, assistant):
        assert sp_tok.decode(ids[a:b].tolist()) == content + IM_END
        assert ids[b - 1] == end_id  # the end-of-turn token is a target...
        assert sp_tok.decode(ids[b:b + 1].tolist()) == "\n"  # ...the newline after it is not
        assert sp_tok.decode(ids[a - 1:a].tolist()) == "\n"  # the header before the content is not
    # Everything unmasked is the non-assistant text: no assistant content leaks into it.
    outside = sp_tok.decode(ids[mask == 0].tolist())
    assert all(c not in outside for c in assistant) and "Be brief." in outside


def test_tokenizer_template_mask(hf_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(hf_dir)
    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    ids, mask = encode_conversation(tok, CONVERSATION, template="tokenizer")
    expected = ref.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=False)
    expected = expected if isinstance(expected, list) else expected["input_ids"]  # transformers 5: a dict
    assert ids.tolist() == expected
    spans = runs(mask)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [ref.decode(ids[a:b].tolist()) for a, b in spans] == [c + "<|endoftext|>" for c in assistant]


@pytest.mark.parametrize("sample,reason", [
    ({"text": "x"}, "missing key 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
])
def test_bad_conversations(sample, reason):
    with pytest.raises(SampleError, match=reason):
        check_messages(sample)


def test_preprocess_sft_stores_the_mask(tmp_path, sp_tok):
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Café naïve."}]]
    src = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": c}) for c in convs]
    lines.insert(1, json.dumps({"messages": [{"role": "tool", "content": "x"}]}))
    src.write_text("\n".join(lines) + "\n")
    opts = Options(tokenizer=str(sp_tok.path), format="sft", text_key="text", messages_key="messages",
                   chat_template="chatml", append_eod=True, add_bos=True)
    with pytest.raises(DataError, match=rf"^{src}:2: message 0 has unknown role 'tool'"):
        preprocess([src], tmp_path / "out", opts)
    summary = preprocess([src], tmp_path / "out", opts, skip_bad_lines=True)
    assert summary.bad_lines == 1 and summary.docs == 3
    ds = IndexedDataset(tmp_path / "out")
    assert ds.has_mask and len(ds) == 3
    for i, conv in enumerate(convs):
        ids, mask = encode_conversation(sp_tok, conv)
        assert ds[i].tolist() == [sp_tok.bos_id] + ids.tolist()  # add_bos: BOS first, never a target
        assert ds.mask(i).tolist() == [0] + mask.tolist()
    assert summary.target_tokens == sum(int(ds.mask(i).sum()) for i in range(3))


def test_truncation_policy(tmp_path):
    # Token values are positions; masks mark targets. seq_length 6.
    docs = [
        ([1, 2, 3], [0, 1, 1]),                        # fits
        ([1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 1, 1, 1, 1, 1]),  # truncated to 6, targets left at 2..5
        ([1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 1, 1]),  # targets only past 6: dropped
        ([1, 2], [1, 0]),                              # the only target is token 0 (never predicted): dropped
        ([5], [1]),                                    # a single token has no label: dropped
    ]
    with IndexedDatasetWriter(tmp_path / "d", np.uint16, with_mask=True) as w:
        for ids, mask in docs:
            w.add(ids, mask)
        w.finalize()
    s = SFTSamples(IndexedDataset(tmp_path / "d"), seq_length=6)
    assert (len(s), s.dropped, s.truncated) == (2, 3, 1)
    assert s.indices.tolist() == [0, 1] and s.lengths.tolist() == [3, 6]
    tokens, mask = s.sample(1)
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6] and mask.tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="no usable sample"):
        SFTSamples(IndexedDataset(tmp_path / "d"), seq_length=1)
