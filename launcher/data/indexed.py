"""Indexed token datasets on disk: `<prefix>.bin` (all documents' ids back to back) + `<prefix>.idx`.

The `.idx` layout is Megatron-LM's "MMIDIDX" format, so megatron-core's own IndexedDataset reads
these files too: header b"MMIDIDX\\x00\\x00", version <Q 1, dtype code <B, sequence count <Q,
document count <Q, then int32 lengths, int64 byte pointers and int64 document indices (the first
sequence of each document, then the sequence count). A document is one sequence, except in
preference datasets, where it is a pair: the chosen then the rejected sequence. SFT and preference
datasets add `<prefix>.mask.bin`: one uint8 per token, 1 where the token is a training target (an
assistant token), at the same positions as `.bin`.

Files are written under temporary names and renamed only when complete, so a reader never sees
half a dataset, and the bytes depend only on the documents (no timestamps, no paths).
"""
from __future__ import annotations

import copy
import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
# Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType).
_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
          np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: uint16 halves the file for vocabularies under 65536."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def dataset_paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    """(`.bin`, `.idx`, `.mask.bin`) for a prefix."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".mask.bin")


class IndexedDatasetWriter:
    """Append documents (and optionally their loss masks), then `finalize()` to publish the files.

    Use as a context manager: leaving the block without finalize() (an error) removes the
    temporary files and leaves any previous dataset under the prefix untouched.
    `sequences_per_document` groups every that many consecutive sequences into one document of
    the index (2: preference pairs).
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype, with_mask: bool = False,
                 sequences_per_document: int = 1) -> None:
        if sequences_per_document < 1:
            raise ValueError(f"sequences_per_document must be positive, got {sequences_per_document}")
        self.sequences_per_document = sequences_per_document
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._final = dataset_paths(prefix)
        suffix = f".tmp{os.getpid()}"
        self._tmp = tuple(Path(str(p) + suffix) for p in self._final)
        self._final[0].parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp[0], "wb")
        self._mask = open(self._tmp[2], "wb") if with_mask else None
        self._lengths: list[int] = []
        self._done = False

    def add(self, tokens: np.ndarray | list[int], mask: np.ndarray | list[int] | None = None) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype}")
        self._bin.write(tokens.astype(self.dtype).tobytes())
        if self._mask is not None:
            if mask is None or len(mask) != len(tokens):
                raise ValueError("a masked dataset needs one mask value per token")
            self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._lengths.append(len(tokens))

    def finalize(self) -> None:
        per_doc = self.sequences_per_document
        if len(self._lengths) % per_doc:
            raise ValueError(f"{len(self._lengths)} sequences do not make documents of {per_doc}")
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(self._tmp[1], "wb") as f:
            f.write(_HEADER + struct.pack("<Q", _VERSION) + struct.pack("<B", _CODES[self.dtype]))
            documents = np.arange(0, len(lengths) + 1, per_doc, dtype=np.int64)
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(documents)))
            f.write(lengths.tobytes() + pointers.tobytes() + documents.tobytes())
            f.flush()
            os.fsync(f.fileno())  # durable before the rename that marks the dataset complete
        for f in (self._bin, self._mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        # .idx last: its presence marks a complete dataset.
        order = [2, 0, 1] if self._mask is not None else [0, 1]
        for i in order:
            os.replace(self._tmp[i], self._final[i])
        if self._mask is None and self._final[2].exists():
            self._final[2].unlink()  # a stale mask from an earlier SFT run under the same prefix
        self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._done:
            for f in (self._bin, self._mask):
                if f is not None:
                    f.close()
            for p in self._tmp:
                p.unlink(missing_ok=True)


class IndexedDataset:
    """Memory-mapped reader: `ds[i]` is the ids of sequence i (a document, or one side of a
    preference pair); `ds.mask(i)` its loss mask (SFT and preference data). `document_indices` are
    the index's document boundaries over the sequences."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        bin_path, idx_path, mask_path = dataset_paths(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"indexed dataset file not found: {p}")
        with open(idx_path, "rb") as f:
            head = f.read(34)
        if len(head) < 34 or head[:9] != _HEADER or struct.unpack("<Q", head[9:17])[0] != _VERSION:
            raise ValueError(f"{idx_path} is not an indexed dataset index (MMIDIDX version 1)")
        self.dtype = _DTYPES[head[17]]
        count, doc_count = struct.unpack("<QQ", head[18:34])
        index = np.memmap(idx_path, mode="r")
        self.lengths = np.frombuffer(index, dtype=np.int32, count=count, offset=34)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=count, offset=34 + 4 * count)
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=doc_count, offset=34 + 12 * count)
        # The flat token stream (documents back to back), shared through the page cache by all ranks.
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_path.stat().st_size else \
            np.zeros(0, dtype=self.dtype)
        self.starts = self.pointers // self.dtype.itemsize  # token offset of each document
        self.masks = None
        if mask_path.is_file():
            self.masks = np.memmap(mask_path, dtype=np.uint8, mode="r") if mask_path.stat().st_size else \
                np.zeros(0, dtype=np.uint8)
            if len(self.masks) != len(self.tokens):
                raise ValueError(f"{mask_path} has {len(self.masks)} entries for {len(self.tokens)} tokens")

    def documents(self, first: int, stop: int) -> IndexedDataset:
        """Documents [first, stop) as a dataset of their own (views of the same memory maps): a
        part of a split (launcher/data/split.py) reads like any dataset."""
        if not 0 <= first <= stop <= len(self):
            raise IndexError(f"documents [{first}, {stop}) of {self.prefix}, which has {len(self)}")
        part = copy.copy(self)
        begin = int(self.starts[first]) if first < len(self) else len(self.tokens)
        end = int(self.starts[stop - 1]) + int(self.lengths[stop - 1]) if stop > first else begin
        part.lengths, part.pointers = self.lengths[first:stop], self.pointers[first:stop] - begin * self.dtype.itemsize
        part.starts = self.starts[first:stop] - begin
        inside = self.document_indices[(self.document_indices > first) & (self.document_indices < stop)] - first
        part.document_indices = np.unique(np.concatenate([[0], inside, [stop - first]])).astype(np.int64)
        part.tokens = self.tokens[begin:end]
        if self.masks is not None:
            part.masks = self.masks[begin:end]
        return part

    @property
    def has_mask(self) -> bool:
        return self.masks is not None

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.starts[i])
        return np.asarray(self.tokens[start:start + int(self.lengths[i])])

    def mask(self, i: int) -> np.ndarray:
        """Document i's per-token loss mask (1 = train to predict this token); all ones without a mask file."""
        if self.masks is None:
            return np.ones(int(self.lengths[i]), dtype=np.uint8)
        start = int(self.starts[i])
        return np.asarray(self.masks[start:start + int(self.lengths[i])])
