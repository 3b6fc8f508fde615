"""Tokenizers and `python -m launcher.preprocess`: jsonl → Megatron-format indexed dataset."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import main_in_process
from tiny_tokenizers import SENTENCES, train_hf, train_sp

from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter
from launcher.data.tokenizer import HFTokenizer, SentencePieceTokenizer, check_vocab_size, fill_id, load_tokenizer
from models.args import padded_vocab_size
from launcher.preprocess import DataError, Options, preprocess

TEXTS = [f"{s} Document {i}." for i, s in enumerate(SENTENCES * 4)] + ["ünïcödé ✓ 😀 and\ttabs\n  and  spaces"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sp(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return train_hf(tmp_path_factory.mktemp("hf") / "tok")


def write_jsonl(path: Path, records: list, raw: dict[int, str] | None = None) -> Path:
    """records as JSON lines; raw[k] replaces line k (1-based) with literal text."""
    lines = [json.dumps(r) for r in records]
    for k, text in (raw or {}).items():
        lines.insert(k - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(capsys, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m launcher.preprocess *overrides`, run in this process: its exit status and output."""
    return subprocess.CompletedProcess(["launcher.preprocess", *overrides],
                                       *main_in_process("launcher.preprocess", list(overrides), capsys))


def options(tokenizer: Path, fmt: str = "pretrain") -> Options:
    return Options(tokenizer=str(tokenizer), format=fmt, text_key="text", messages_key="messages",
                   chat_template="chatml", append_eod=True, add_bos=False)


# --- tokenizers ---------------------------------------------------------------------------------

def test_sentencepiece_tokenizer_interface(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (ref.get_piece_size(), 0, 2, 3)
    for text in TEXTS[-3:]:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == text
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == ref.encode(text)
        # Character spans tile the text (pieces are contiguous), whatever the UTF-8 widths.
        assert "".join(text[a:b] for a, b in offsets) == text


def test_hf_tokenizer_interface(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    for path in (hf_dir, hf_dir / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert isinstance(tok, HFTokenizer)
        assert tok.vocab_size == len(ref)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, ref.eos_token_id, ref.pad_token_id)
        assert tok.chat_template == ref.chat_template
        for text in TEXTS[-3:]:
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
            assert tok.decode(tok.encode(text)) == text
    assert fill_id(tok) == ref.pad_token_id


def test_hf_tokenizer_without_config_guesses_known_special_names(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.chat_template is None and tok.bos_id is None
    assert tok.eos_id == tok.encode("<|endoftext|>")[0] and tok.pad_id == tok.encode("<pad>")[0]


def test_vocab_check_names_both_sizes_and_the_file(sp_model):
    tok = load_tokenizer(sp_model)
    check_vocab_size(tok, 320)
    check_vocab_size(tok, padded_vocab_size(320))  # a TP-padded embedding holds every id
    assert padded_vocab_size(320) == 384 and padded_vocab_size(256) == 256
    with pytest.raises(ValueError, match=rf"{sp_model}.* 320 tokens .*model.vocab_size is 256"):
        check_vocab_size(tok, 256)


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# --- indexed dataset ------------------------------------------------------------------------------

def test_preprocess_round_trips_and_megatron_reads_it(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS] + [{"text": ""}])
    summary = preprocess([src], tmp_path / "out", options(sp_model))
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    expected = [ref.encode(t) + [ref.eos_id()] for t in TEXTS]
    assert (summary.docs, summary.tokens, summary.empty) == (len(TEXTS), sum(map(len, expected)), 1)
    ds = IndexedDataset(tmp_path / "out")
    assert len(ds) == len(TEXTS) and not ds.has_mask and ds.tokens.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert [ref.decode(ds[i][:-1].tolist()) for i in range(len(ds))] == TEXTS
    # megatron-core's own reader of the format: same documents.
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    mds = MegatronIndexed(str(tmp_path / "out"))
    assert len(mds) == len(TEXTS) and [mds[i].tolist() for i in range(len(mds))] == expected
    # Histogram buckets: [2^k, 2^(k+1)).
    lengths = np.array([len(e) for e in expected])
    for k, count in summary.lengths.items():
        assert count == int(((lengths >= 2**k) & (lengths < 2**(k + 1))).sum())


def test_rerun_is_byte_identical_for_any_worker_count(tmp_path, hf_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS * 3])
    preprocess([src], tmp_path / "a", options(hf_dir))
    proc = cli(capsys, f"input=[{src},{src}]", f"output_prefix={tmp_path / 'b'}", f"tokenizer={hf_dir}", "workers=2",
               "chunk_size=5")
    assert proc.returncode == 0, proc.stderr
    assert "documents: 150" in proc.stdout and "document length histogram" in proc.stdout
    proc = cli(capsys, f"input={src}", f"output_prefix={tmp_path / 'c'}", f"tokenizer={hf_dir}", "workers=2",
               "chunk_size=7")
    assert proc.returncode == 0, proc.stderr
    for suffix in (".bin", ".idx"):
        a, c = (tmp_path / f"a{suffix}").read_bytes(), (tmp_path / f"c{suffix}").read_bytes()
        assert a == c and len(a) > 0
    # Two copies of the input: twice the documents, in order.
    a, b = IndexedDataset(tmp_path / "a"), IndexedDataset(tmp_path / "b")
    assert [b[i].tolist() for i in range(len(b))] == [a[i].tolist() for i in range(len(a))] * 2
    assert not list(tmp_path.glob("*.tmp*"))


def test_malformed_line_names_file_and_line_and_publishes_nothing(tmp_path, sp_model, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": t} for t in TEXTS[:5]],
                      raw={3: '{"text": "unterminated', 6: '{"txt": "wrong key"}'})
    proc = cli(capsys, f"input={src}", f"output_prefix={tmp_path / 'out'}", f"tokenizer={sp_model}", "workers=2",
               "chunk_size=2")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"data error: {src}:3: invalid JSON: Unterminated string starting "
                                                f"at (column 10)"]
    assert not list(tmp_path.glob("out*"))
    proc = cli(capsys, f"input={src}", f"output_prefix={tmp_path / 'out'}", f"tokenizer={sp_model}",
               "skip_bad_lines=true")
    assert proc.returncode == 0, proc.stderr
    assert "skipped bad lines: 2" in proc.stdout and "documents: 5" in proc.stdout
    assert len(IndexedDataset(tmp_path / "out")) == 5


@pytest.mark.parametrize("raw,reason", [
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"text": 7}', "'text' must be a string, got int"),
    ('{"body": "x"}', "missing key 'text'"),
])
def test_each_kind_of_bad_record(tmp_path, sp_model, raw, reason):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}], raw={2: raw})
    with pytest.raises(DataError, match=rf"^{src}:2: {reason}"):
        preprocess([src], tmp_path / "out", options(sp_model))


def test_bad_inputs_are_one_line_errors(tmp_path, sp_model, capsys):
    out = f"output_prefix={tmp_path / 'o'}"
    proc = cli(capsys, f"input={tmp_path / 'missing.jsonl'}", out, f"tokenizer={sp_model}")
    assert proc.returncode == 1 and proc.stderr.strip() == f"data error: {tmp_path / 'missing.jsonl'}: no such file"
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    proc = cli(capsys, f"input={empty}", out, f"tokenizer={sp_model}")
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"data error: {empty}: no documents")
    proc = cli(capsys, f"input={empty}", out, f"tokenizer={tmp_path / 'nope.model'}")
    assert proc.returncode == 2 and "nope.model" in proc.stderr
    proc = cli(capsys, f"input={empty}", out, f"tokenizer={sp_model}", "formt=sft")
    assert proc.returncode != 0 and "formt" in proc.stderr  # unknown keys are errors
    proc = cli(capsys, f"input={empty}", out, f"tokenizer={sp_model}", "format=chat")
    assert proc.returncode == 2 and "format: 'chat'" in proc.stderr


def test_parquet_needs_pyarrow_or_round_trips(tmp_path, sp_model):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = tmp_path / "in.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"in.parquet: reading parquet needs pyarrow"):
            preprocess([path], tmp_path / "out", options(sp_model))
        return
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": TEXTS}), path)
    preprocess([path], tmp_path / "out", options(sp_model))
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    ds = IndexedDataset(tmp_path / "out")
    assert [ds[i].tolist() for i in range(len(ds))] == [ref.encode(t) + [ref.eos_id()] for t in TEXTS]


def test_writer_error_keeps_the_previous_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        w.add([1, 2, 3])
        w.finalize()
    with pytest.raises(ValueError, match="out of range"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add([4, 5])
            w.add([70000])
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 1 and ds[0].tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
