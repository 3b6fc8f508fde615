"""The DPO reference's log-probs on disk: one .npy per (run, dataset, row length).

A run with `train.objective=dpo dpo.reference=precomputed` computes, at its start, the summed
response log-probs of every usable pair under its initial weights (launcher/preference_reference.py)
and keeps them in `<run.dir>/reference_logps/<dataset name>-<fingerprint>.npy`: float64
[pairs, 2] (chosen, rejected), indexed like PreferencePairs' usable pairs. The run directory
fixes the initial weights (a fresh start always recomputes the file; every resume reads it);
the fingerprint fixes the data: the contents of the dataset's index and mask files, the size of
its token file, the row length and whether rows are packed (which decide which pairs are usable).
The file is written to a temporary name in the same directory and renamed into place, so a
reader sees a whole file or none.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

DIRECTORY = "reference_logps"


def fingerprint(prefix: str | Path, seq_length: int, packed: bool = False, documents: range | None = None) -> str:
    """A short hash of the dataset at `prefix` (its .idx and .mask.bin contents, its .bin size), the row
    length, packing and the part of its pairs used (data.split)."""
    part = f" documents={documents.start}:{documents.stop}" if documents is not None else ""
    digest = hashlib.sha256(f"seq_length={seq_length}{' packed' if packed else ''}{part}".encode())
    for suffix in (".idx", ".mask.bin"):
        path = Path(f"{prefix}{suffix}")
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    digest.update(str(Path(f"{prefix}.bin").stat().st_size).encode())
    return digest.hexdigest()[:16]


def reference_path(run_dir: str | Path, prefix: str | Path, seq_length: int, packed: bool = False,
                   documents: range | None = None) -> Path:
    """Where a run keeps the reference log-probs of dataset `prefix` (its pairs `documents`, all by default)
    at rows of `seq_length` (packed or not)."""
    name = f"{Path(prefix).name}-{fingerprint(prefix, seq_length, packed, documents)}.npy"
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
