"""The default pretraining data (stdlib corpus, tokenizer, cached indexed dataset); the (seed, step) → batch map."""
from __future__ import annotations

import ast
import multiprocessing as mp
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from launcher.config.validate import typed
from launcher.data import pretrain
from launcher.data.corpus import build_stdlib_corpus, read_documents
from launcher.data.gpt_dataset import IndexedWindows, microbatches
from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter
from launcher.data.pretrain import prepare_default_corpus
from launcher.data.tokenizer import SentencePieceTokenizer

VOCAB, CORPUS_BYTES = 512, 300_000
BUILDING = "building default corpus + tokenizer"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    return prepare_default_corpus(tmp_path_factory.mktemp("cache"), VOCAB, CORPUS_BYTES)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> list[str]:
    return read_documents(build_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", CORPUS_BYTES))


def positional_stream(tmp_path: Path, n: int) -> IndexedDataset:
    """One document whose token at position p is p: any window tells exactly where it was cut from."""
    prefix = tmp_path / f"positions{n}"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add(np.arange(n, dtype=np.uint16))
        writer.finalize()
    return IndexedDataset(prefix)


# --- corpus -------------------------------------------------------------------------------------

def test_corpus_is_deterministic_bounded_and_well_formed(tmp_path, documents):
    a = build_stdlib_corpus(tmp_path / "a.txt", CORPUS_BYTES).read_bytes()
    b = build_stdlib_corpus(tmp_path / "b.txt", CORPUS_BYTES).read_bytes()
    assert a == b
    # The stdlib has far more than 300 kB of docstrings, so the budget is filled up to one document.
    assert CORPUS_BYTES - max(len(d.encode()) for d in documents) - 2 <= len(a) <= CORPUS_BYTES
    assert len(documents) > 100
    assert all(d and d == d.strip("\n") and "\n\n" not in d for d in documents)
    assert len(set(documents)) == len(documents)


def test_corpus_comes_from_stdlib_docstrings_in_file_order(tmp_path, documents):
    small = read_documents(build_stdlib_corpus(tmp_path / "small.txt", 20_000))
    assert 0 < len(small) < len(documents)
    assert small == documents[:len(small)]  # a smaller budget only truncates
    # The first .py file of the sorted stdlib walk is __future__.py; its module docstring opens the corpus.
    source = Path(sysconfig.get_paths()["stdlib"], "__future__.py").read_text()
    expected = ast.get_docstring(ast.parse(source))
    assert small[0].split() == expected.split()
    assert small[0].splitlines()[0] == expected.splitlines()[0]


# --- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_ids_and_round_trip(built, documents):
    tok = SentencePieceTokenizer(built[0])
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 2, 3)
    for text in [documents[0], "    indented  code\n\tx = 1  # naïve café → ✓ 😀", "  leading\n\ntrailing  "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids) and 1 not in ids  # byte fallback: never <unk>
    assert len(tok.encode(documents[0])) < len(documents[0].encode())  # it learned merges, not just bytes


def test_missing_tokenizer_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")


def tokens(prefix: Path) -> np.ndarray:
    return np.asarray(IndexedDataset(prefix).tokens)


# --- cached indexed dataset ----------------------------------------------------------------------

def test_token_stream_decodes_to_the_corpus_documents(built, documents):
    tok = SentencePieceTokenizer(built[0])
    ds = IndexedDataset(built[1])
    assert ds.dtype == np.uint16 and not ds.has_mask and ds.tokens[-1] == tok.eos_id
    assert len(ds) == len(documents)  # one indexed document per corpus document, followed by its EOS
    assert all(ds[i][-1] == tok.eos_id and tok.eos_id not in ds[i][:-1] for i in range(len(ds)))
    assert [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))] == documents
    # Documents back to back: the flat stream is what the windows are cut from.
    assert np.array_equal(ds.tokens, np.concatenate([ds[i] for i in range(len(ds))]))


def test_default_data_reads_the_corpus_in_its_seeded_window_order(built):
    """The trainer's stdlib_docs stream: window i of epoch e is window default_rng([train.seed, e]).permutation[i]."""
    from launcher.train import build_data

    seq, seed = 64, 1234
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"data.cache_dir={built[0].parent.parent}", f"model.vocab_size={VOCAB}",
                                           f"data.tokenizer_vocab_size={VOCAB}", f"data.max_corpus_bytes={CORPUS_BYTES}",
                                           f"train.seq_length={seq}", f"train.seed={seed}"])
    batches = build_data(typed(cfg)).batches(step=1, dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=4)
    flat = tokens(built[1]).astype(np.int64)
    perm = np.random.default_rng([seed, 0]).permutation((len(flat) - 1) // seq)
    windows = np.stack([flat[c * seq:c * seq + seq + 1] for c in perm[4:8]])
    assert torch.equal(concat(batches, "tokens"), torch.from_numpy(windows[:, :-1]))
    assert torch.equal(concat(batches, "labels"), torch.from_numpy(windows[:, 1:]))
    assert bool((concat(batches, "loss_mask") == 1).all()) and all("cu_seqlens" not in b for b in batches)


def test_concurrent_prepare_builds_once(tmp_path, built, capfd):
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(prepare_default_corpus, [(tmp_path, VOCAB, CORPUS_BYTES)] * 2)
    assert results[0] == results[1]
    assert capfd.readouterr().err.count(BUILDING) == 1  # the lock made the second process wait and reuse
    model, prefix = results[0]
    assert not list(model.parent.glob("*partial*")) and not list(model.parent.glob("*.tmp*"))
    # Same inputs in another cache dir give the same dataset files and tokenizer.
    for suffix in (".bin", ".idx"):
        assert Path(f"{prefix}{suffix}").read_bytes() == Path(f"{built[1]}{suffix}").read_bytes()
    text = "Return the number of items in a sequence."
    assert SentencePieceTokenizer(model).encode(text) == SentencePieceTokenizer(built[0]).encode(text)
    assert prepare_default_corpus(tmp_path, VOCAB, CORPUS_BYTES) == results[0]
    assert BUILDING not in capfd.readouterr().err  # cached now


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path, built, monkeypatch, capfd):
    def crash(corpus_path: Path, model_prefix: Path, vocab_size: int) -> Path:
        Path(f"{model_prefix}.model").write_bytes(b"half a model")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(pretrain, "train_sentencepiece", crash)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        prepare_default_corpus(tmp_path, VOCAB, CORPUS_BYTES)
    monkeypatch.undo()
    model, prefix = prepare_default_corpus(tmp_path, VOCAB, CORPUS_BYTES)
    assert capfd.readouterr().err.count(BUILDING) == 2  # the retry rebuilt instead of trusting leftovers
    assert np.array_equal(tokens(prefix), tokens(built[1]))
    assert SentencePieceTokenizer(model).vocab_size == VOCAB


# --- windows and batches -------------------------------------------------------------------------

def test_windows_overlap_by_one_and_each_epoch_is_a_new_permutation(tmp_path):
    seq = 16
    stream = positional_stream(tmp_path, 64 * seq + 5)
    ds = IndexedWindows(stream, seq, seed=7)
    assert len(ds) == 64  # (n - 1) // seq full windows of seq + 1 tokens
    epochs = []
    for epoch in range(3):
        starts = []
        for i in range(epoch * len(ds), (epoch + 1) * len(ds)):
            w = ds[i]
            assert w.dtype == np.int64 and w[0] % seq == 0
            assert np.array_equal(w, np.arange(w[0], w[0] + seq + 1))
            starts.append(int(w[0]) // seq)
        assert sorted(starts) == list(range(len(ds)))
        epochs.append(starts)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(len(ds)))
    # The order is a function of the seed alone.
    assert [int(IndexedWindows(stream, seq, seed=7)[i][0]) for i in range(len(ds))] == [s * seq for s in epochs[0]]
    assert [int(IndexedWindows(stream, seq, seed=8)[i][0]) for i in range(len(ds))] != [s * seq for s in epochs[0]]
    with pytest.raises(IndexError, match=">= 0"):
        ds[-1]


def test_too_short_stream_raises_naming_the_dataset(tmp_path):
    with pytest.raises(ValueError, match="positions16"):
        IndexedWindows(positional_stream(tmp_path, 16), 16, seed=0)
    assert len(IndexedWindows(positional_stream(tmp_path, 17), 16, seed=0)) == 1


def concat(batches: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


@pytest.mark.parametrize("dp_size,mbs", [(2, 1), (2, 2), (4, 1), (8, 1)])
def test_global_batch_is_independent_of_dp_size(tmp_path, dp_size, mbs):
    seq, gbs = 8, 8
    ds = IndexedWindows(positional_stream(tmp_path, 50 * seq + 1), seq, seed=3)
    for step in (0, 1, 7):  # 50 windows / 8 per step: step 7 crosses into epoch 1
        reference = microbatches(ds, step=step, dp_rank=0, dp_size=1, micro_batch_size=gbs, global_batch_size=gbs)
        ranks = [microbatches(ds, step=step, dp_rank=r, dp_size=dp_size, micro_batch_size=mbs,
                              global_batch_size=gbs) for r in range(dp_size)]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(torch.cat([concat(r, key) for r in ranks]), concat(reference, key))
        for batches in ranks:
            assert len(batches) == gbs // (dp_size * mbs)


def test_micro_batch_contents(tmp_path):
    seq, gbs, mbs = 8, 8, 2
    ds = IndexedWindows(positional_stream(tmp_path, 40 * seq + 1), seq, seed=0)
    batches = microbatches(ds, step=0, dp_rank=1, dp_size=2, micro_batch_size=mbs, global_batch_size=gbs)
    assert len(batches) == 2
    for b in batches:
        assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == b["position_ids"].shape == (mbs, seq)
        assert b["tokens"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.long
        assert b["loss_mask"].dtype == torch.float32 and bool((b["loss_mask"] == 1).all())
        assert torch.equal(b["labels"], b["tokens"] + 1)  # positional stream: next token = position + 1
        assert torch.equal(b["position_ids"], torch.arange(seq).expand(mbs, seq))


def test_steps_walk_the_epochs(tmp_path):
    seq, gbs = 4, 8
    ds = IndexedWindows(positional_stream(tmp_path, 32 * seq + 1), seq, seed=5)  # 32 windows = 4 steps per epoch

    def starts(step: int) -> list[int]:
        b = microbatches(ds, step=step, dp_rank=0, dp_size=1, micro_batch_size=4, global_batch_size=gbs)
        return (concat(b, "tokens")[:, 0] // seq).tolist()

    epoch0 = [c for step in range(4) for c in starts(step)]
    epoch1 = [c for step in range(4, 8) for c in starts(step)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))  # every window once per epoch
    assert epoch0 != epoch1
    assert len({tuple(starts(s)) for s in range(8)}) == 8  # each step its own batch
    # A fresh dataset (a resumed run) gives the same batch for a step without replaying earlier ones.
    resumed = IndexedWindows(IndexedDataset(ds.dataset.prefix), seq, seed=5)
    b = microbatches(resumed, step=5, dp_rank=0, dp_size=1, micro_batch_size=4, global_batch_size=gbs)
    assert (concat(b, "tokens")[:, 0] // seq).tolist() == starts(5)


def test_microbatches_rejects_bad_shapes(tmp_path):
    ds = IndexedWindows(positional_stream(tmp_path, 100), 8, seed=0)
    with pytest.raises(ValueError, match="not divisible"):
        microbatches(ds, step=0, dp_rank=0, dp_size=4, micro_batch_size=1, global_batch_size=10)
    with pytest.raises(ValueError, match="dp_rank"):
        microbatches(ds, step=0, dp_rank=2, dp_size=2, micro_batch_size=1, global_batch_size=4)
