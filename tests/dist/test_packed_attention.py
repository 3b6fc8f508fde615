"""Packed (THD, cu_seqlens) compute path: equal to the unpacked batch and document-isolated."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli


def test_no_token_attends_across_documents():
    assert "ISOLATION OK" in run_cli("tests.scripts.document_isolation", []).stdout


@pytest.mark.parametrize("tp,pp,nproc", [(1, 1, 1), (2, 1, 2), (1, 2, 2)], ids=["single", "tp2", "pp2"])
def test_packed_loss_equals_unpacked(tp, pp, nproc):
    out = run_cli("tests.scripts.packed_vs_unpacked", [str(tp), str(pp)], nproc=nproc).stdout
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    packed, unpacked = result["packed"], result["unpacked"]
    assert packed["microbatches"] < unpacked["microbatches"]  # packing did pack
    assert packed["tokens"] == unpacked["tokens"]
    for a, b in zip(packed["loss"], unpacked["loss"]):
        assert a == pytest.approx(b, rel=1e-6)
    for a, b in zip(packed["grad_norm"], unpacked["grad_norm"]):
        assert a == pytest.approx(b, rel=1e-6)
