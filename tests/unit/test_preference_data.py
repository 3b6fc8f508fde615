"""Preference data: the record shapes rendered and masked, preprocess format=preference, bad rows
with file:line, pairs longer than seq_length, and the pair reader."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tiny_tokenizers import IM_END, IM_START, train_hf, train_sp

from launcher.data.indexed import IndexedDataset
from launcher.data.preference import PreferencePairs, check_record, encode_pair
from launcher.data.sft import SampleError
from launcher.data.tokenizer import load_tokenizer
from launcher.preprocess import DataError, Options, preprocess

PROMPT = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "What does add(a, b) return?"},
          {"role": "assistant", "content": "It returns a + b."},  # an earlier turn: prompt, never a target
          {"role": "user", "content": "And for 12345 and 678?"}]
CHOSEN, REJECTED = "The quick answer: 13023.", "A user asks a question."
STANDARD = {"prompt": "Return the number of items: ", "chosen": "12345", "rejected": "lazy dog."}
CONVERSATIONAL = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],
                  "rejected": [{"role": "assistant", "content": REJECTED}]}
MESSAGES = {"messages": [*PROMPT, {"role": "assistant", "content": CHOSEN}], "rejected_response": REJECTED}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sp(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return train_hf(tmp_path_factory.mktemp("hf") / "tok")


def options(tokenizer: Path, **kw) -> Options:
    base = dict(tokenizer=str(tokenizer), format="preference", text_key="text", messages_key="messages",
                chat_template="chatml", append_eod=True, add_bos=False)
    return Options(**{**base, **kw})


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def test_standard_shape_is_plain_text_with_eos(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(sp_model)
    pair = encode_pair(tok, check_record(STANDARD))
    # Hand-checked pieces: the prompt's trailing space is its own piece and stays in the prompt;
    # digits are split; every response piece and the EOS after it are targets, nothing else.
    targets = {"chosen": ["1", "2", "3", "4", "5", "</s>"],
               "rejected": ["l", "a", "z", "y", "▁", "d", "o", "g", ".", "</s>"]}
    for side, response in (("chosen", "12345"), ("rejected", "lazy dog.")):
        ids, mask = getattr(pair, f"{side}_ids"), getattr(pair, f"{side}_mask")
        # Independent: the raw sentencepiece processor on prompt + response as one text, then EOS.
        assert ids.tolist() == sp.encode(STANDARD["prompt"] + response) + [sp.eos_id()]
        assert runs(mask) == [(len(ids) - len(targets[side]), len(ids))]
        assert [sp.id_to_piece(int(i)) for i in ids[mask == 1]] == targets[side]
        assert [sp.id_to_piece(int(i)) for i in ids[mask == 0]][-2:] == [":", "▁"]


def test_conversational_and_messages_shapes_mask_only_the_final_response(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(sp_model)
    conversational = encode_pair(tok, check_record(CONVERSATIONAL))
    messages = encode_pair(tok, check_record(MESSAGES))
    for pair in (conversational, messages):
        for ids, mask, response in ((pair.chosen_ids, pair.chosen_mask, CHOSEN),
                                    (pair.rejected_ids, pair.rejected_mask, REJECTED)):
            text = chatml([*PROMPT, {"role": "assistant", "content": response}])
            assert ids.tolist() == sp.encode(text)
            (start, end), = runs(mask)  # one run: the earlier assistant turn is not a target
            assert sp.decode(ids[start:end].tolist()) == response + IM_END
            assert sp.decode(ids[end:].tolist()) == "\n"
            assert "It returns a + b." in sp.decode(ids[:start].tolist())
    for a, b in ((conversational.chosen_ids, messages.chosen_ids), (conversational.rejected_mask, messages.rejected_mask)):
        assert np.array_equal(a, b)  # the two shapes of one pair give the same sequences


def test_tokenizer_chat_template(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    pair = encode_pair(load_tokenizer(hf_dir), check_record(MESSAGES), template="tokenizer")
    for ids, mask, response in ((pair.chosen_ids, pair.chosen_mask, CHOSEN),
                                (pair.rejected_ids, pair.rejected_mask, REJECTED)):
        expected = ref.apply_chat_template([*PROMPT, {"role": "assistant", "content": response}], tokenize=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]
        assert ids.tolist() == expected
        assert [ref.decode(ids[a:b].tolist()) for a, b in runs(mask)] == [response + "<|endoftext|>"]


BAD = [
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, "missing field 'prompt'"),
    ({"messages": MESSAGES["messages"]}, "missing field 'rejected_response'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "empty response 'chosen'"),
    ({**CONVERSATIONAL, "rejected": [{"role": "assistant", "content": ""}]}, "empty response 'rejected'"),
    ({**MESSAGES, "rejected_response": ""}, "empty response 'rejected_response'"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}, "all be message lists"),
    ({**CONVERSATIONAL, "chosen": [{"role": "user", "content": "c"}]}, "'chosen' message 0 is a user message"),
    ({"messages": PROMPT, "rejected_response": "r"}, "last message of 'messages' must be the assistant's"),
    ({"messages": [{"role": "assistant", "content": "c"}], "rejected_response": "r"}, "no prompt before"),
    ({**CONVERSATIONAL, "prompt": [{"role": "bot", "content": "x"}]}, "'prompt' message 0 has unknown role 'bot'"),
]


@pytest.mark.parametrize("record,reason", BAD, ids=[reason for _, reason in BAD])
def test_bad_row_is_one_error_with_file_and_line(tmp_path, sp_model, record, reason):
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (STANDARD, MESSAGES, record, STANDARD)) + "\n")
    with pytest.raises(DataError) as err:
        preprocess([src], tmp_path / "out", options(sp_model))
    assert str(err.value).startswith(f"{src}:3: ") and reason in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.idx").exists()  # nothing half-written
    summary = preprocess([src], tmp_path / "out", options(sp_model), skip_bad_lines=True)
    assert (summary.pairs, summary.bad_lines) == (3, 1)


def test_preprocess_writes_pairs_that_read_back(tmp_path, sp_model):
    records = [STANDARD, CONVERSATIONAL, MESSAGES]
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    opts = options(sp_model, add_bos=True)
    summary = preprocess([src], tmp_path / "out", opts, workers=1, chunk_size=2)
    tok = load_tokenizer(sp_model)
    ds = IndexedDataset(tmp_path / "out")
    assert len(ds) == 6 and ds.has_mask and ds.document_indices.tolist() == [0, 2, 4, 6]  # a document per pair
    pairs = list(PreferencePairs(ds))
    assert len(pairs) == 3 and summary.pairs == 3
    for record, pair in zip(records, pairs):
        expected = encode_pair(tok, check_record(record), add_bos=True)
        for side in ("chosen", "rejected"):
            ids, mask = getattr(pair, f"{side}_ids"), getattr(pair, f"{side}_mask")
            assert ids.tolist() == getattr(expected, f"{side}_ids").tolist()
            assert mask.tolist() == getattr(expected, f"{side}_mask").tolist()
            assert ids[0] == tok.bos_id and mask[0] == 0
    assert summary.target_tokens == sum(int(p.chosen_mask.sum()) for p in pairs)
    assert summary.rejected_target_tokens == sum(int(p.rejected_mask.sum()) for p in pairs)
    assert summary.lines("preference")[0] == "pairs: 3"


def test_pairs_longer_than_seq_length_error_or_skip(tmp_path, sp_model):
    tok = load_tokenizer(sp_model)
    long = {"prompt": "p: ", "chosen": "ok", "rejected": " ".join(["The quick brown fox."] * 8)}
    limit = encode_pair(tok, check_record(MESSAGES)).longest
    assert encode_pair(tok, check_record(long)).longest > limit
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (MESSAGES, long, MESSAGES)) + "\n")
    with pytest.raises(DataError, match=rf"^{src}:2: the pair does not fit seq_length {limit} "):
        preprocess([src], tmp_path / "out", options(sp_model, seq_length=limit))
    summary = preprocess([src], tmp_path / "out", options(sp_model, seq_length=limit), skip_too_long=True)
    assert (summary.pairs, summary.too_long) == (2, 1)
    # The reader applies the same rule for a shorter train.seq_length
    preprocess([src], tmp_path / "all", options(sp_model))
    pairs = PreferencePairs(IndexedDataset(tmp_path / "all"), seq_length=limit)
    assert (len(pairs), pairs.dropped) == (2, 1) and pairs.indices.tolist() == [0, 2]
    with pytest.raises(ValueError, match="no usable pair at seq_length 5"):
        PreferencePairs(IndexedDataset(tmp_path / "all"), seq_length=5)


def test_parquet_rows_of_message_lists(tmp_path, sp_model):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([CONVERSATIONAL, CONVERSATIONAL]), path)
    preprocess([path], tmp_path / "out", options(sp_model))
    expected = encode_pair(load_tokenizer(sp_model), check_record(CONVERSATIONAL))
    for pair in PreferencePairs(IndexedDataset(tmp_path / "out")):
        assert pair.chosen_ids.tolist() == expected.chosen_ids.tolist()
        assert pair.rejected_mask.tolist() == expected.rejected_mask.tolist()


def test_reader_refuses_a_dataset_that_is_not_pairs(tmp_path, sp_model):
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps({"messages": MESSAGES["messages"]}) for _ in range(2)) + "\n")
    preprocess([src], tmp_path / "sft", options(sp_model, format="sft"))
    with pytest.raises(ValueError, match="is not a preference dataset"):
        PreferencePairs(IndexedDataset(tmp_path / "sft"))


def test_check_record_returns_plain_shapes():
    record = check_record({**MESSAGES, "rejected_response": {"role": "assistant", "content": REJECTED}})
    assert record.conversational and record.prompt == PROMPT
    assert record.rejected == [{"role": "assistant", "content": REJECTED}]
    with pytest.raises(SampleError, match="expected a JSON object"):
        check_record(["not", "a", "dict"])
