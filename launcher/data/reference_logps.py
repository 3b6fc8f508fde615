"""The DPO reference's log-probs on disk: one .npy per (run, datasets, row length).

A run with `train.objective=dpo dpo.reference=precomputed` computes, at its start, the summed
response log-probs of every usable pair under its initial weights (launcher/preference_reference.py)
and keeps them in `<run.dir>/reference_logps/<dataset name>[+<more datasets>]-<fingerprint>.npy`:
float64 [pairs, 2] (chosen, rejected), indexed like the usable pairs (launcher/data/preference.py:
one dataset's, or several datasets' one after the other). The run directory fixes the initial
weights (a fresh start always recomputes the file; every resume reads it); the fingerprint fixes
the data: the contents of each dataset's index and mask files, the size of its token file, the part
of its pairs read (data.split), the row length and whether rows are packed (which decide which pairs
are usable).
The file is written to a temporary name in the same directory and renamed into place, so a
reader sees a whole file or none.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

DIRECTORY = "reference_logps"


Sources = list[tuple[str | Path, range | None]]  # (dataset prefix, its part of the pairs or None: all)


def fingerprint(sources: Sources, seq_length: int, packed: bool = False) -> str:
    """A short hash of the datasets (each one's .idx and .mask.bin contents, its .bin size, the part of its
    pairs used: data.split), the row length and packing."""
    digest = hashlib.sha256(f"seq_length={seq_length}{' packed' if packed else ''}".encode())
    for prefix, documents in sources:
        if documents is not None:
            digest.update(f"documents={documents.start}:{documents.stop}".encode())
        for suffix in (".idx", ".mask.bin"):
            path = Path(f"{prefix}{suffix}")
            if path.is_file():
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
        digest.update(str(Path(f"{prefix}.bin").stat().st_size).encode())
    return digest.hexdigest()[:16]


def reference_path(run_dir: str | Path, sources: Sources, seq_length: int, packed: bool = False) -> Path:
    """Where a run keeps the reference log-probs of these datasets' pairs, read one dataset after the
    other, at rows of `seq_length` (packed or not)."""
    more = f"+{len(sources) - 1}" if len(sources) > 1 else ""
    name = f"{Path(sources[0][0]).name}{more}-{fingerprint(sources, seq_length, packed)}.npy"
    return Path(run_dir) / DIRECTORY / name


def save(path: Path, logps: np.ndarray) -> None:
    """Write `logps` [pairs, 2] to `path` atomically (temporary file + rename)."""
    if logps.ndim != 2 or logps.shape[1] != 2:
        raise ValueError(f"reference log-probs must be [pairs, 2], got shape {logps.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, logps.astype(np.float64))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, pairs: int) -> np.ndarray:
    """The reference log-probs at `path`; ValueError when they are not [pairs, 2]."""
    logps = np.load(path)
    if logps.shape != (pairs, 2):
        raise ValueError(f"{path} holds reference log-probs of shape {logps.shape}, expected ({pairs}, 2)")
    return logps
