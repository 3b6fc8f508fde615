"""Packed (THD, cu_seqlens) compute path: equal to the unpacked batch and document-isolated."""
from __future__ import annotations

import json

import pytest

from conftest import run_many

PACKED_VS_UNPACKED = "tests.scripts.packed_vs_unpacked"  # args: tp pp


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    """tests/scripts/document_isolation.py and tests/scripts/packed_vs_unpacked.py in each layout:
    their outputs, one launch per world size."""
    isolation, single = run_many([["tests.scripts.document_isolation"], [PACKED_VS_UNPACKED, "1", "1"]])
    tp2, pp2 = run_many([[PACKED_VS_UNPACKED, "2", "1"], [PACKED_VS_UNPACKED, "1", "2"]], nproc=2)
    return {"isolation": isolation, "single": single, "tp2": tp2, "pp2": pp2}


def test_no_token_attends_across_documents(outputs):
    assert "ISOLATION OK" in outputs["isolation"]


@pytest.mark.parametrize("name", ["single", "tp2", "pp2"])
def test_packed_loss_equals_unpacked(outputs, name):
    out = outputs[name]
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    packed, unpacked = result["packed"], result["unpacked"]
    assert packed["microbatches"] < unpacked["microbatches"]  # packing did pack
    assert packed["tokens"] == unpacked["tokens"]
    for a, b in zip(packed["loss"], unpacked["loss"]):
        assert a == pytest.approx(b, rel=1e-6)
    for a, b in zip(packed["grad_norm"], unpacked["grad_norm"]):
        assert a == pytest.approx(b, rel=1e-6)
