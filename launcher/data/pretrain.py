"""The default pretraining stream: a cached, tokenized stdlib-docstring corpus cut into fixed windows.

The stream is a pure function of (seed, step): global batch `step` is a fixed set of samples
whatever the data-parallel size, so layouts can be compared sample-for-sample and a resumed
run continues exactly where the checkpoint left off.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import numpy as np
import torch

from launcher.data.corpus import build_stdlib_corpus, read_documents
from launcher.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

# Bump when the corpus/tokenizer/stream format changes so stale caches are not reused.
_CACHE_FORMAT = 1


def _commit(tmp: Path, final: Path) -> None:
    """Make tmp durable, then atomically give it its final name: readers see all of it or nothing."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def prepare_default_corpus(cache_dir: Path, vocab_size: int, max_corpus_bytes: int) -> tuple[Path, Path]:
    """Build (once) the stdlib corpus, its tokenizer and token stream; returns (tokenizer_model, tokens_npy).

    Safe to call from every rank at once before any process group exists: one process builds
    under an flock while the others wait, then everyone reads the finished files.
    """
    py = "{}.{}".format(*sys.version_info[:2])  # the stdlib, hence the corpus, differs per Python version
    out = Path(cache_dir) / f"stdlib_docs-py{py}-v{vocab_size}-{max_corpus_bytes}-f{_CACHE_FORMAT}"
    model_path, tokens_path = out / "tokenizer.model", out / "tokens.npy"
    # tokens.npy is committed last, so its presence means the whole build finished.
    if model_path.is_file() and tokens_path.is_file():
        return model_path, tokens_path

    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel even if this process is killed
        if not (model_path.is_file() and tokens_path.is_file()):  # another process may have built it meanwhile
            print(f"shardforge: building default corpus + tokenizer in {out} (first use)…", file=sys.stderr,
                  flush=True)
            _build(out, vocab_size, max_corpus_bytes)
    return model_path, tokens_path


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
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.int32
    # EOS after every document so the model learns where one docstring ends and the next begins.
    stream = [np.asarray(ids + [tokenizer.eos_id], dtype=dtype) for ids in tokenizer.encode_batch(documents)]
    tokens_tmp = out / "tokens.npy.partial"
    with open(tokens_tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, np.concatenate(stream) if stream else np.zeros(0, dtype=dtype))
    _commit(tokens_tmp, out / "tokens.npy")


class TokenChunks:
    """Fixed windows of seq_length + 1 tokens over a flat token file, in a seeded order per epoch.

    Chunk c covers tokens [c*S, c*S + S]: consecutive windows share one token, as in
    Megatron's GPT dataset, so every token is a label exactly once per epoch.
    """

    def __init__(self, tokens_path: Path, seq_length: int, seed: int) -> None:
        self.tokens_path = Path(tokens_path)
        self.seq_length = seq_length
        self.seed = seed
        self._tokens = np.load(self.tokens_path, mmap_mode="r")  # ranks share the page cache, no copies
        self._num_chunks = (len(self._tokens) - 1) // seq_length
        if self._num_chunks < 1:
            raise ValueError(f"{self.tokens_path} holds {len(self._tokens)} tokens, fewer than one window of "
                             f"seq_length + 1 = {seq_length + 1}")
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return self._num_chunks

    def _permutation(self, epoch: int) -> np.ndarray:
        # Consecutive samples usually share an epoch: keep the last permutation instead of redrawing it.
        if epoch != self._perm_epoch:
            # (seed, epoch) as separate entropy words: seed + epoch would make seed 1 / epoch 0 equal seed 0 / epoch 1.
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._num_chunks)
            self._perm_epoch = epoch
        return self._perm

    def __getitem__(self, i: int) -> np.ndarray:
        """Global sample i (any non-negative int; indices past the end run into the next epochs)."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, position = divmod(int(i), self._num_chunks)
        start = int(self._permutation(epoch)[position]) * self.seq_length
        return np.asarray(self._tokens[start:start + self.seq_length + 1], dtype=np.int64)


def microbatches(dataset: TokenChunks, *, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                 global_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro batches of optimizer step `step` (0-based).

    The global batch is samples [step*G, (step+1)*G); rank r takes the contiguous slice
    [r*G/dp, (r+1)*G/dp), so concatenating the ranks gives the dp=1 batch.
    """
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size} x "
                         f"micro_batch_size {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    seq = dataset.seq_length
    positions = torch.arange(seq, dtype=torch.long).unsqueeze(0).repeat(micro_batch_size, 1)
    batches = []
    for start in range(first, first + per_rank, micro_batch_size):
        windows = torch.from_numpy(np.stack([dataset[i] for i in range(start, start + micro_batch_size)]))
        batches.append({
            "tokens": windows[:, :-1].contiguous(),
            "labels": windows[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch_size, seq, dtype=torch.float32),
            "position_ids": positions.clone(),  # clone: a consumer may modify one micro batch in place
        })
    return batches
