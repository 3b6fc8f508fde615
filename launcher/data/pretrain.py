"""The default pretraining data: a cached, tokenized stdlib-docstring corpus as an indexed dataset.

`prepare_default_corpus` builds (once) the corpus, a sentencepiece tokenizer trained on it, and
the tokenized documents (each followed by EOS) as the indexed dataset `<cache dir>/stdlib`. The
trainer reads it like any preprocessed dataset (`launcher.data.training_data`).
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from launcher.data.corpus import build_stdlib_corpus, read_documents
from launcher.data.indexed import IndexedDatasetWriter, dataset_paths, token_dtype
from launcher.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

# Bump when the corpus/tokenizer/stream format changes so stale caches are not reused.
_CACHE_FORMAT = 2


def _commit(tmp: Path, final: Path) -> None:
    """Make tmp durable, then atomically give it its final name: readers see all of it or nothing."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def prepare_default_corpus(cache_dir: Path, vocab_size: int, max_corpus_bytes: int) -> tuple[Path, Path]:
    """Build (once) the stdlib corpus, its tokenizer and indexed dataset; returns (tokenizer_model, dataset_prefix).

    Safe to call from every rank at once before any process group exists: one process builds
    under an flock while the others wait, then everyone reads the finished files.
    """
    py = "{}.{}".format(*sys.version_info[:2])  # the stdlib, hence the corpus, differs per Python version
    out = Path(cache_dir) / f"stdlib_docs-py{py}-v{vocab_size}-{max_corpus_bytes}-f{_CACHE_FORMAT}"
    model_path, prefix = out / "tokenizer.model", out / "stdlib"
    idx_path = dataset_paths(prefix)[1]
    # The dataset's .idx is committed last (after its .bin), so its presence means the whole build finished.
    if model_path.is_file() and idx_path.is_file():
        return model_path, prefix

    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel even if this process is killed
        if not (model_path.is_file() and idx_path.is_file()):  # another process may have built it meanwhile
            print(f"shardforge: building default corpus + tokenizer in {out} (first use)…", file=sys.stderr,
                  flush=True)
            _build(out, vocab_size, max_corpus_bytes)
    return model_path, prefix


def _build(out: Path, vocab_size: int, max_corpus_bytes: int) -> None:
    # Fixed ".partial" names: only the lock holder writes them, and a killed build's leftovers are overwritten.
    corpus_tmp = build_stdlib_corpus(out / "corpus.txt.partial", max_corpus_bytes)
    _commit(corpus_tmp, out / "corpus.txt")

    prefix = out / "tokenizer.partial"
    model_tmp = train_sentencepiece(out / "corpus.txt", prefix, vocab_size)
    os.replace(Path(f"{prefix}.vocab"), out / "tokenizer.vocab")  # human-readable piece list, not used
    _commit(model_tmp, out / "tokenizer.model")

    tokenizer = SentencePieceTokenizer(out / "tokenizer.model")
    documents = read_documents(out / "corpus.txt")
    for stale in out.glob("stdlib.*.tmp*"):  # a killed build's temporary dataset files
        stale.unlink()
    # EOS after every document so the model learns where one docstring ends and the next begins.
    # The writer fsyncs its files and renames them only when complete, .idx last.
    with IndexedDatasetWriter(out / "stdlib", token_dtype(tokenizer.vocab_size)) as writer:
        for ids in tokenizer.encode_batch(documents):
            writer.add(ids + [tokenizer.eos_id])
        writer.finalize()
