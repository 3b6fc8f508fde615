"""The parallel layout of a run: how the world's ranks split into TP × PP × CP × DP (× EP)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int | None = None   # virtual stages per pipeline rank (interleaved schedule)
    cp: int = 1
    ep: int = 1
    dp: int = 1

    def __str__(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return f"world={self.world_size} tp={self.tp} pp={self.pp}{vpp} cp={self.cp} ep={self.ep} dp={self.dp}"
